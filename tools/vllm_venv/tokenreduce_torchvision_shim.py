"""torchvision's Python parts on a CPU torch that has no matching CPU torchvision build.

vLLM's LLaVA imports pixtral, which imports transformers' pixtral image processor, which
imports torchvision (its transforms: plain PyTorch). No CPU torchvision wheel exists for
torch 2.13 on PyPI, so pip picks a CUDA-linked 0.28.0 whose native ``_C.so`` cannot load on a
CPU torch. torchvision tolerates that (``extension._has_ops()`` is then False and every meta
kernel it registers is guarded by it) except for two fake kernels registered unconditionally,
``torchvision::nms`` and ``torchvision::qnms``, which raise "operator torchvision::nms does
not exist". This module defines those two schemas (the same signatures torchvision's C++
registers) just before torchvision is first imported, so the import succeeds; calling them
would still fail loudly (no kernel). Nothing happens when the native library loads (a real
CPU build) or torchvision is never imported.

tools/vllm_venv.sh copies this file and a one-line ``.pth`` that imports it into
.venv-vllm's site-packages (a .pth runs at the start of every Python process of the venv,
vLLM's worker processes included). Only a meta path finder is installed at start-up; torch is
imported only when torchvision is.
"""
import importlib.abc
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
_LIBRARIES = []   # keeps the torch.library.Library alive (its definitions die with it)


def _schema_exists(name: str) -> bool:
    import torch

    try:
        torch._C._get_schema("torchvision::" + name, "")
        return True
    except RuntimeError:
        return False


def _define_before_native(origin: str) -> None:
    """Define the missing schemas unless torchvision's native library loads on this torch."""
    import os

    import torch

    native = os.path.join(os.path.dirname(origin), "_C.so")
    if os.path.exists(native):
        try:
            torch.ops.load_library(native)   # a real CPU build: nothing to do
            return
        except (ImportError, OSError):
            pass
    missing = [s for s in _SCHEMAS if not _schema_exists(s.split("(")[0])]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing:
            lib.define(schema)
        _LIBRARIES.append(lib)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs once, at the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec("torchvision")
        if spec is not None and spec.origin:
            _define_before_native(spec.origin)
        return None   # the normal finders import torchvision


if not any(type(f).__name__ == "_BeforeTorchvision" for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
