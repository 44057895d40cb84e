"""`tokenreduce.models.cpu_linear`: oneDNN pre-packed linears equal nn.Linear."""
import pytest
import torch
from torch import nn

from tokenreduce.models import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 37), (3, 5, 37), (2, 118, 37), (2, 1, 3, 37)])
def test_packed_equals_linear(dtype, tol, bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(37, 53, bias=bias).to(dtype)
    packed = cpu_linear.PackedLinear.from_linear(lin, rows_hint=7)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        ref, got = lin(x), packed(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_non_contiguous_and_other_dtype_input():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8)
    packed = cpu_linear.PackedLinear.from_linear(lin)
    x = torch.randn(16, 4).t()            # [4, 16], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x.double()), lin(x), atol=1e-5, rtol=1e-5)


def test_prepack_linears_replaces_in_place_and_keeps_outputs():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Sequential(nn.Linear(20, 6, bias=False)), nn.LayerNorm(6))
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        ref = m(x)
        assert cpu_linear.prepack_linears(m) == 2
        got = m(x)
    assert isinstance(m[0], cpu_linear.PackedLinear) and isinstance(m[2][0], cpu_linear.PackedLinear)
    assert cpu_linear.prepack_linears(m) == 0            # idempotent: nothing plain left
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert "packed=onednn" in repr(m[0])


def test_can_prepack_refuses_other_dtypes_and_modules():
    assert not cpu_linear.can_prepack(nn.Linear(4, 4).double())
    assert not cpu_linear.can_prepack(nn.LayerNorm(4))
    assert cpu_linear.can_prepack(nn.Linear(4, 4))
