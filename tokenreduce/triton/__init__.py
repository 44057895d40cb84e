"""Triton implementations of tokenreduce ops (GPU, or CPU through the Triton interpreter).

Import this package only where Triton is installed; `tokenreduce.backends` decides when the
ops route here (see README.md, "Backends").
"""
from .attention_with_scores import attention_with_scores, flash_forward  # noqa: F401

__all__ = ["attention_with_scores", "flash_forward"]
