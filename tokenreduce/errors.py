"""The one error helper of the package: every message starts with ``tokenreduce.<where>:``.

``where`` names the op (``kcenter``), the method (``methods.visionzip``), the backend table
(``backends``) or the CLI command, so a user sees which part refused which argument.
This module imports nothing from tokenreduce: every layer may use it.
"""
from __future__ import annotations

from typing import NoReturn, Type


def fail(where: str, msg: str, exc: Type[Exception] = ValueError) -> NoReturn:
    """Raise ``exc("tokenreduce.<where>: <msg>")``."""
    raise exc(f"tokenreduce.{where}: {msg}")
