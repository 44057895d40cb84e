import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tolerance of outputs stored in the input dtype (both sides accumulate in float32)
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test id so failures reproduce."""
    g = torch.Generator().manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    return g


@pytest.fixture(params=["on", "off"])
def bf16_screen(request, monkeypatch):
    """The CPU ops' bf16 screen forced on, then off (TOKENREDUCE_BF16_SCREEN; unforced, the
    library measures per machine whether it pays), so both paths run on every machine."""
    monkeypatch.setenv("TOKENREDUCE_BF16_SCREEN", request.param)
    return request.param


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def pytest_report_header(config):
    """The fuzz suite's seed (fresh each run unless TOKENREDUCE_FUZZ_SEED is set)."""
    import os
    import random

    os.environ.setdefault("TOKENREDUCE_FUZZ_SEED", str(random.SystemRandom().randrange(2**31)))
    return f"tokenreduce fuzz seed: {os.environ['TOKENREDUCE_FUZZ_SEED']} (TOKENREDUCE_FUZZ_SEED=... to rerun)"
