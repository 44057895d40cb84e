"""The published reduction methods, written on the core ops.

    from tokenreduce import methods
    methods.available()                      # registered names
    m = methods.build("visionzip", keep=64)  # a Method (or budget=methods.Budget(keep=64))
    red = m(methods.Context(x=feats, has_cls=True, cls_attn={-2: attn}))   # -> Reduction

Each method lives in its own module of this package and registers its class with
``@register``, the one rule: every public module here is imported on first use, so adding a
method is adding a file, and there is no list of modules to skip. The modules that are not
methods (`base`: the framework types, `helpers`: the shared batched helpers,
`merge_schedule` / `llm_stages`: base classes of method families) are imported by the methods
anyway and register nothing.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, List, Optional, Type

from ..errors import fail
from .base import Budget, Context, Method, Need, Reduction, Stage  # noqa: F401
from .helpers import gather_tokens, keep_indices, source_from_index, topk_indices  # noqa: F401

_REGISTRY: Dict[str, Type[Method]] = {}
_LOADED = False


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
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> List[str]:
    """Names of the registered methods, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Type[Method]:
    _load_all()
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        fail("methods", f"unknown method {name!r}; available: {', '.join(available())}", KeyError)
    return _REGISTRY[key]


def build(name: str, keep: Optional[int] = None, ratio: Optional[float] = None, *,
          budget: Optional[Budget] = None, **options: Any) -> Method:
    """``build("divprune", keep=64)``, ``build("tome", r=16)``, ``build("fastv", ratio=0.5, layer=2)``,
    ``build("visionzip", budget=Budget(keep=64))``."""
    return get(name)(keep, ratio, budget=budget, **options)


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
