"""Helpers of the method tests: Contexts from CLIP-L-like tensors (577 tokens incl. [CLS], D=1024)."""
import torch

from tokenreduce.methods import Context
from tokenreduce.testing.synthetic import ClipLike


def ctx_of(d, dtype=torch.float32, **kw):
    """Context of a ClipLike for the projector stage (attention of a 24-layer ViT)."""
    return Context(x=d.x.to(dtype), keys=d.keys.to(dtype), has_cls=True, cls_attn=d.cls_attn,
                   grid=d.grid, num_layers=24, **kw)


def per_sample(d, b):
    """Batch row b of a ClipLike as a batch of one."""
    return ClipLike(d.x[b:b + 1], d.keys[b:b + 1], {l: t[b:b + 1] for l, t in d.cls_heads.items()},
                    {l: t[b:b + 1] for l, t in d.cls_attn.items()}, d.grid)


# fixtures (imported by the test modules: a conftest.py here would shadow tests/conftest.py,
# which other test files import as ``conftest``)
import pytest  # noqa: E402

from tokenreduce.testing.synthetic import clip_like  # noqa: E402


@pytest.fixture(scope="session")
def clip1():
    return clip_like(1, 576, 1024, seed=11, layers=range(24))


@pytest.fixture(scope="session")
def clip3():
    return clip_like(3, 576, 1024, seed=12, layers=range(24))
