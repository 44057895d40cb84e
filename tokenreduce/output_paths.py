"""Output files of the CLI: checked before a run, written so that a finished result is never lost.

    check_writable("--json", path)      # before the run: a ValueError naming the flag
    write_or_keep(write, report, path)  # after it: on failure the result goes to a fallback file
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Optional, Tuple

from .errors import fail


def check_writable(flag: str, path: str, where: str = "cli") -> str:
    """The absolute path, once it is known to be a writable file location (its folders are
    created); a ValueError naming ``flag`` otherwise: a directory, a path under a file, a
    folder without write permission, a special file system."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        fail(where, f"{flag} {path}: is a directory; give a file name")
    parent = os.path.dirname(full)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        fail(where, f"{flag} {path}: {probe} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
        existed = os.path.exists(full)
        with open(full, "a"):
            pass
        if not existed:
            os.remove(full)
    except OSError as e:
        fail(where, f"{flag} {path}: cannot write there ({e.strerror or e})")
    return full


def write_or_keep(write: Callable[[Any, str], str], report: Any, path: str,
                  suffix: str) -> Tuple[str, Optional[str]]:
    """``write(report, path)``; when that fails after the run, the result goes to a fallback
    file in the temp folder instead. Returns (the path written, the error or None)."""
    try:
        return write(report, path), None
    except OSError as e:
        fd, spare = tempfile.mkstemp(prefix=f"tokenreduce-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=suffix)
        os.close(fd)
        return write(report, spare), f"{path}: {e.strerror or e}"
