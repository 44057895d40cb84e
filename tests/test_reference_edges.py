"""The oracle's own edge cases agree with the ops (k = 0, negative first, ToMe's [B, N, 1] size, T = 0)."""
import math

import pytest
import torch

from tokenreduce import ops, reference


def test_kcenter_k0_and_negative_tensor_first():
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    for k, first in ((0, 0), (3, torch.tensor([-1, -7]))):
        a, b = ops.kcenter(x, k, first=first), reference.kcenter(x, k, first=first)
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert bool(torch.isinf(reference.kcenter(x, 0)[1]).all()) and math.isinf(float(ops.kcenter(x, 0)[1][0, 0]))


def test_bipartite_merge_tome_size_shape():
    x, s = torch.randn(2, 9, 4, dtype=torch.float64), torch.rand(2, 9, 1, dtype=torch.float64) + 0.5
    for a, b in zip(ops.bipartite_merge(x, 3, size=s), reference.bipartite_merge(x, 3, size=s)):
        assert torch.allclose(a.double(), b.double())


def test_recycle_without_targets():
    x, t, s = torch.randn(2, 7, 5), torch.zeros(2, 0, dtype=torch.long), torch.tensor([[1, 2], [3, 4]])
    drop = torch.full((2, 2), -1)
    a, b = ops.recycle(x, t, s, assign=drop), reference.recycle(x, t, s, assign=drop)
    assert a[0].shape == b[0].shape == (2, 0, 5) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="at least one target"):
        reference.recycle(x, t, s)
    with pytest.raises(ValueError, match="at least one target"):
        ops.recycle(x, t, s)
