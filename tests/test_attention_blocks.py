"""attention_with_scores CPU: the query rows are cut into equal blocks (csrc/attention_with_scores/
attention_with_scores_cpu.cpp); edge counts of rows and a few scored rows against the reference."""
import pytest
import torch

from tokenreduce import measure, ops, reference


def test_no_query_rows():
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8)
    out, scores = ops.attention_with_scores(q, k, k)
    assert out.shape == (1, 2, 0, 8) and torch.equal(scores, torch.zeros(1, 5))


@pytest.mark.parametrize("nq", [1, 117, 129, 577])
@pytest.mark.parametrize("rows", [None, [0], [0, -1, 5]])
def test_block_counts_and_few_scored_rows(nq, rows):
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(2, 3, nq, 16, generator=g)
    k, v = torch.randn(2, 3, 300, 16, generator=g), torch.randn(2, 3, 300, 16, generator=g)
    sr = None if rows is None else torch.tensor(rows) % nq
    out, scores = ops.attention_with_scores(q, k, v, score_rows=sr)
    rout, rscores = reference.attention_with_scores(q, k, v, score_rows=sr)
    torch.testing.assert_close(out, rout, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-4)
    with measure.threads(1):
        out1, scores1 = ops.attention_with_scores(q, k, v, score_rows=sr)
    assert torch.equal(out, out1) and torch.equal(scores, scores1)  # thread-count independent
