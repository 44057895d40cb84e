"""A watcher that fails on host <-> device traffic, usable on a machine without a GPU.

The accelerator is played by the ``meta`` device: data never exists there, so every way
code could move data between host and device shows up as one of:

* a sync: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``aten.nonzero``,
  ``aten.equal``, ``aten.is_nonzero`` (recorded before they run, since meta cannot run them);
* a copy of a host tensor into the device (``aten._to_copy`` / ``aten.copy_`` from a CPU
  tensor to meta: ``cpu_tensor.to(x.device)``);
* a host tensor of one or more elements mixed into a device op (an implicit transfer;
  0-dim CPU scalars are passed by value and are allowed, as on CUDA);
* a Python list or number turned into a device tensor (``torch.tensor(data, device=...)`` /
  ``torch.as_tensor``): seen by a TorchFunctionMode, since the meta device creates it
  without any dispatch.

(Fake CUDA tensors would be closer to the real thing, but on a CPU-only torch build Python
indexing of a CUDA-device tensor fails before dispatch, so they cannot run the methods.)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostTraffic(AssertionError):
    pass


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: List[str]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_device = any(t.device == DEVICE for t in tensors)
        if func in _SYNCS:
            self.seen.append(f"sync: {func}")
        elif func in _COPIES:
            to = kwargs.get("device")
            dst = args[0] if func is torch.ops.aten.copy_.default else None
            src = args[1] if dst is not None else args[0]
            if src.device.type == "cpu" and ((to is not None and torch.device(to) == DEVICE)
                                             or (dst is not None and dst.device == DEVICE)):
                self.seen.append(f"host->device copy: {func} of shape {tuple(src.shape)}")
        elif on_device and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.seen.append(f"host tensor in a device op: {func}")
        return func(*args, **kwargs)


class _Factories(TorchFunctionMode):
    def __init__(self, seen: List[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev) == DEVICE:
                self.seen.append(f"host data -> device tensor: torch.{func.__name__}({args[0]!r:.40})")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_traffic() -> Iterator[List[str]]:
    """Run the block on meta-device inputs; raise HostTraffic listing every event at exit."""
    seen: List[str] = []
    with _Factories(seen), _Dispatch(seen):
        yield seen
    if seen:
        raise HostTraffic("host<->device traffic:\n  " + "\n  ".join(dict.fromkeys(seen)))


def to_device(tree: Any) -> Any:
    """Every tensor in a (nested) structure, moved to the stand-in device."""
    return tree_map(lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v, tree)
