"""The bench's plain-torch peers (`tokenreduce.bench.peers`): they compute what the op
computes, and the runner times them in the same run with our ratio over each."""
import pytest
import torch

from tokenreduce import bench, ops, reference
from tokenreduce.bench import peers


def test_gram_greedy_matches_reference():
    x = torch.randn(3, 70, 24, generator=torch.Generator().manual_seed(1))
    for first in (0, 5, -1):
        idx, md = peers.kcenter_gram_greedy(x, 12, first)
        ridx, rmd = reference.kcenter(x, 12, first=first)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(md, rmd, atol=1e-5, rtol=1e-5)


def test_sdpa_row_pass_matches_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    rows = torch.tensor([0, 16])
    out, scores = peers.sdpa_with_row_scores(q, k, v, rows)
    rout, rscores = reference.attention_with_scores(q, k, v, score_rows=rows)
    torch.testing.assert_close(out, rout, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, rscores, atol=1e-6, rtol=1e-5)


def test_variants_and_peers_of_the_cases():
    base = bench.cases(quick=True)
    full = bench.cases(quick=True, variants=True)
    assert [c.op for c in base] == list(bench.CASE_BUILDERS)  # one case per op by default
    extra = [c for c in full if c.variant]
    assert [(c.op, c.test_id) for c in extra] == [("attention_with_scores",
                                                   "attention_with_scores-cls")]
    assert "rows=[0]" in extra[0].shape
    names = {c.test_id: [p.name for p in c.peers()] for c in full}
    assert names["kcenter"] == ["batched Gram greedy", "batched Gram greedy (compiled step)"]
    assert names["attention_with_scores"] == ["SDPA (no scores)"]
    assert names["attention_with_scores-cls"] == ["SDPA + row pass", "SDPA (no scores)"]
    assert names["dpp_select"] == ["CDPruner authors' loop", "fast greedy DPP (OpenVINO-style)"]
    assert all(p.compiled for c in full if c.op in ("bipartite_merge", "recycle")
               for p in c.peers())


@pytest.mark.parametrize("test_id", ["kcenter", "attention_with_scores-cls"])
def test_measure_case_times_the_eager_peers(test_id, monkeypatch):
    case = next(c for c in bench.cases(quick=True, variants=True) if c.test_id == test_id)
    eager = tuple(p for p in case.peers() if not p.compiled)  # keep the test quick
    case = type(case)(**{**case.__dict__, "peers": lambda: eager})
    rows = bench.measure_case(case, warmup=1, repeat=3, memory=False, peers=True)
    assert [r["impl"] for r in rows] == ["tokenreduce", "reference"] + [p.name for p in eager]
    assert [r["role"] for r in rows] == ["tokenreduce", "reference"] + ["peer"] * len(eager)
    ours = rows[0]
    for r, p in zip(rows[2:], eager):
        assert r["vs_peer"] == pytest.approx(r["median_ms"] / ours["median_ms"])
        assert r["target"] == p.target and r["target_met"] is None  # quick: not checked
        assert r["correct"] is True
    assert rows[1]["vs_peer"] is None and ours["vs_peer"] is None


def test_quick_mode_runs_no_peers():
    case = bench.cases(quick=True, op_names=["kcenter"])[0]
    rows = bench.measure_case(case, warmup=1, repeat=3, memory=False)
    assert [r["impl"] for r in rows] == ["tokenreduce", "reference"]


def test_a_wrong_peer_is_never_timed():
    case = bench.cases(quick=True, op_names=["kcenter"])[0]
    bad = bench.Peer("wrong", lambda x: (ops.kcenter(x, 3)[0], None))
    case = type(case)(**{**case.__dict__, "peers": lambda: (bad,)})
    with pytest.raises(AssertionError):
        bench.measure_case(case, warmup=1, repeat=3, memory=False, peers=True)
