"""The package's layers stay visible: no module imports a layer above it, none imports another
module's `_private` names, and none is over ~400 lines without a reason written at its top."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "tokenreduce"
# lowest first; a module may import its own layer and those below it
LAYERS = [
    {"_C", "errors"},
    {"ops", "reference", "backends", "triton", "nvrtc"},
    {"methods"},
    {"models", "images"},
    {"profile", "bench", "measure", "output_paths", "testing", "vllm"},
    {"cli", "__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _top(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0][:-3] if rel[0].endswith(".py") else rel[0]


def _imports(path: pathlib.Path):
    """(top-level tokenreduce module imported, names imported from it, line) per import."""
    rel = path.relative_to(PKG)
    pkg_parts = list(rel.parts[:-1])
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tokenreduce":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            if not target:   # from . import x, y: each name is a module of the package
                for n in names:
                    yield n, [], target + [n], node.lineno
            else:
                yield target[0], names, target, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "tokenreduce" and len(parts) > 1:
                    yield parts[1], [], parts[1:], node.lineno


def _is_module(target):
    p = PKG.joinpath(*target)
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists() or target == ["_C"]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_import_up_a_layer_and_no_private_names(path):
    mine = _top(path)
    for top, names, target, line in _imports(path):
        assert LAYER.get(top, 0) <= LAYER[mine], \
            f"{path.relative_to(PKG)}:{line} imports {'.'.join(target)} from a layer above ({mine} < {top})"
        for n in names:
            if n.startswith("_") and not _is_module(target + [n]) and not n.startswith("__"):
                assert False, f"{path.relative_to(PKG)}:{line} imports the private name {n} of {'.'.join(target)}"


@pytest.mark.parametrize("path", [p for p in _modules() if len(p.read_text().splitlines()) > 420],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_long_modules_say_why(path):
    head = (ast.get_docstring(ast.parse(path.read_text())) or "").lower()
    assert "why" in head and "lines" in head, f"{path.relative_to(PKG)} is long: say why at its top"
