"""The published reduction methods, written on the core ops.

    import tokenreduce.methods as M
    M.available()                      # registered names
    m = M.build("visionzip", keep=64)  # a Method
    red = m(M.Context(x=feats, has_cls=True, cls_attn={-2: attn}))   # -> Reduction

Each method lives in its own module of this package and registers itself with
`register`; every module here is imported on first use, so adding a method is adding a
file.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, List, Optional, Type

from .base import (Budget, Context, Method, Need, Reduction, Stage, gather_tokens,  # noqa: F401
                   keep_indices, resolve_keep, source_from_index, topk_indices)

_REGISTRY: Dict[str, Type[Method]] = {}
_LOADED = False
_NOT_METHODS = {"base", "registry"}


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> List[str]:
    """Names of the registered methods, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Type[Method]:
    _load_all()
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise KeyError(f"tokenreduce.methods: unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key]


def build(name: str, **budget_and_options: Any) -> Method:
    """``build("divprune", keep=64)``, ``build("tome", r=16)``, ``build("fastv", ratio=0.5, layer=2)``."""
    return get(name)(**budget_and_options)


def describe_all() -> List[Dict[str, Any]]:
    return [get(n).describe() for n in available()]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "-"


def markdown_table(names: Optional[List[str]] = None) -> str:
    """The README's methods table, generated from the declarations (`describe_all`):
    name, paper, where it runs, what it needs, budgets, faithful to, known deviations."""
    rows = describe_all() if names is None else [get(n).describe() for n in names]
    head = ("| method | paper | runs | needs | budgets | faithful to | deviations |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [f"| `{r['name']}` | {_cell(r['paper'])} | {_cell(r['stage'])} | "
             f"{_cell(', '.join(r['needs']))} | {_cell(r['budgets'])} | {_cell(r['faithful_to'])} | "
             f"{_cell(r['deviations'])} |" for r in rows]
    return head + "\n".join(lines) + "\n"
