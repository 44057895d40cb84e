"""The declared ranges (pyproject.toml), the tested set (constraints.txt) and the installed
packages agree, so a fresh machine gets versions the tests have seen."""
import importlib.metadata as md
import os
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(name: str):
    pins = {}
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{name}: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _declared():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        if extra != "nvrtc":          # CuPy only where torch sees a GPU
            reqs += [Requirement(r) for r in items]
    return reqs


def test_every_declared_dependency_has_a_range_and_a_tested_pin_inside_it():
    pins = _pins("constraints.txt")
    for req in _declared():
        name = canonicalize_name(req.name)
        assert str(req.specifier), f"pyproject.toml: {req.name} has no version range"
        assert name in pins, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside the declared {req.specifier}"


def test_lowest_transformers_is_the_declared_lower_bound():
    lowest = _pins("constraints-lowest.txt")["transformers"]
    (req,) = [r for r in _declared() if r.name == "transformers"]
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert lower == [lowest], f"constraints-lowest.txt tests {lowest}, pyproject declares {req.specifier}"


def test_installed_versions_are_the_tested_ones():
    if os.environ.get("PYTHONPATH", "").find(".venv-lowest-transformers") >= 0:
        pytest.skip("the lowest-transformers run replaces some pins on purpose")
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip("not the .venv that ./setup.sh makes (another stack has its own pins, e.g. "
                    "tools/gpu_stack_constraints.txt)")
    pins = _pins("constraints.txt")
    wrong = []
    for name, pin in pins.items():     # the distribution import finds first (not vendored copies)
        try:
            have = Version(md.version(name))
        except md.PackageNotFoundError:
            wrong.append(f"{name} not installed (tested: {pin})")
            continue
        if have.public != pin.public:
            wrong.append(f"{name} {have} (tested: {pin})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(sorted(wrong))
