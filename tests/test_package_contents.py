"""The built package is the library only: `tokenreduce.testing` (the authors' algorithms
re-implemented as test oracles, synthetic inputs) is for tests/ and bench/ from a checkout,
is left out of the wheel by setup.py, and nothing in the library imports it."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tokenreduce"


def test_build_py_leaves_out_the_test_only_package(tmp_path):
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    built = out / "tokenreduce"
    assert (built / "ops" / "__init__.py").is_file() and (built / "methods" / "__init__.py").is_file()
    assert (built / "models" / "__init__.py").is_file() and (built / "profile" / "__init__.py").is_file()
    assert not (built / "testing").exists()
    assert [p for p in built.rglob("*") if "testing" in p.relative_to(built).parts] == []


def test_the_library_does_not_import_the_test_only_package():
    pattern = re.compile(r"^\s*(from|import)\s+(tokenreduce\.testing|\.+testing)\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if "testing" not in p.relative_to(PACKAGE).parts and pattern.search(p.read_text())]
    assert offenders == []


def test_the_checkout_imports_the_test_only_package():
    from tokenreduce.testing import authors, synthetic

    assert Path(authors.__file__).parent == PACKAGE / "testing" / "authors"
    assert callable(authors.bench_cases) and callable(synthetic.clip_like)
