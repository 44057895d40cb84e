"""The Triton attention_with_scores (under the Triton interpreter, on the CPU) and backend selection.

Triton decides interpreter vs. GPU compilation when it is first imported (TRITON_INTERPRET=1 has
to be set before that), and other tests (torch.compile / inductor) may import triton first in this
process. So the kernel cases run once, all together, in a subprocess started with
TRITON_INTERPRET=1 (this file run as a script with --worker); each case is then a pytest test that
reads its result. The worker also runs `ops.attention_with_scores(backend="triton")` and the race
script's --dry-run. The selection logic is plain Python and is tested in this process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (B, H, Hkv, Nq, Nk, Dh, Dv, dtype, causal, bias, score_rows, extra)
#   bias: None | "mask" (random, first half of batch 0 at -inf) | "dead" (batch 1 all -inf)
#   extra: "strided" (q/k/v as transposed views, bias with a stride), "splits" (3 head splits)
CASES = {
    "full_n33_d16_f32": (2, 4, 2, 33, 33, 16, 16, "float32", False, None, None, ""),
    "full_causal_n65_d24_f32": (2, 4, 2, 65, 65, 24, 24, "float32", True, None, None, ""),
    "causal_nq7_nk65_d64_dv32_mask_f32": (2, 4, 2, 7, 65, 64, 32, "float32", True, "mask", None, ""),
    "rows_repeats_causal_nq65_nk7_dead_f32": (2, 4, 2, 65, 7, 64, 64, "float32", True, "dead", [0, -1, -1, 3], ""),
    "cls_row_n65_d16_bf16": (2, 4, 2, 65, 65, 16, 16, "bfloat16", False, "mask", [0], ""),
    "last_row_causal_n65_d24_f16": (2, 4, 2, 65, 65, 24, 24, "float16", True, None, [-1], ""),
    "n1_d16_f32": (2, 4, 1, 1, 1, 16, 16, "float32", False, None, None, ""),
    "splits_strided_causal_nq33_nk65_bf16": (2, 4, 2, 33, 65, 64, 64, "bfloat16", True, "mask", None, "strided,splits"),
    "rows_splits_n7_d24_f32": (2, 4, 2, 7, 7, 24, 24, "float32", False, None, [6, 0, 6], "splits"),
    "rows_list_neg_causal_n33_d16_f32": (2, 4, 2, 33, 33, 16, 16, "float32", True, None, [-33, -2, 5], "list"),
}
TOL_OUT = {"float32": (2e-5, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}
TOL_SCORES = (2e-6, 1e-4)  # scores are float32 sums of float32 probabilities on both sides


# --------------------------------------------------------------------------------------
# worker: runs inside the TRITON_INTERPRET=1 subprocess
# --------------------------------------------------------------------------------------


def _make_case(B, H, Hkv, Nq, Nk, Dh, Dv, dtype, causal, bias, rows, extra, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if "strided" in extra:  # [B, N, H, D] storage seen as [B, H, N, D], as a fused QKV would give
        q = torch.randn(B, Nq, H, Dh, generator=g).to(dt).transpose(1, 2)
        k = torch.randn(B, Nk, Hkv, Dh, generator=g).to(dt).transpose(1, 2)
        v = torch.randn(B, Nk, Hkv, 2 * Dv, generator=g).to(dt).transpose(1, 2)[..., ::2]
    else:
        q = torch.randn(B, H, Nq, Dh, generator=g).to(dt)
        k = torch.randn(B, Hkv, Nk, Dh, generator=g).to(dt)
        v = torch.randn(B, Hkv, Nk, Dv, generator=g).to(dt)
    key_bias = None
    if bias:
        key_bias = torch.randn(B, 2 * Nk, generator=g)[:, ::2] if "strided" in extra else torch.randn(B, Nk, generator=g)
        if bias == "mask":
            key_bias[0, : Nk // 2] = -math.inf
        elif bias == "dead":
            key_bias[1] = -math.inf
    score_rows = None if rows is None else rows if "list" in extra else torch.tensor(rows)
    return q, k, v, dict(causal=causal, key_bias=key_bias, score_rows=score_rows)


def _close(name, got, want, atol, rtol):
    import torch

    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as e:
        return f"{name}: {e}"
    return ""


def _run_worker() -> dict:
    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from tokenreduce import ops, reference
    from tokenreduce.triton import attention_with_scores, flash_forward

    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        try:
            q, k, v, kw = _make_case(*case, seed=1000 + i)
            config = dict(head_splits=3) if "splits" in case[-1] else None
            out, scores = attention_with_scores(q, k, v, config=config, **kw)
            rout, rscores = reference.attention_with_scores(q, k, v, **kw)
            err = []
            if out.dtype != q.dtype or out.shape != rout.shape or not out.is_contiguous():
                err.append(f"out: dtype {out.dtype} shape {tuple(out.shape)}")
            if scores.dtype != torch.float32 or scores.shape != rscores.shape:
                err.append(f"scores: dtype {scores.dtype} shape {tuple(scores.shape)}")
            err.append(_close("out", out, rout, *TOL_OUT[case[7]]))
            err.append(_close("scores", scores, rscores, *TOL_SCORES))
            results[name] = "; ".join(e for e in err if e)
        except Exception as e:  # reported per case
            results[name] = f"raised {type(e).__name__}: {e}"

    def extra(name, fn):
        try:
            results[name] = fn() or ""
        except Exception as e:
            results[name] = f"raised {type(e).__name__}: {e}"

    def lse_matches_logsumexp():
        q, k, v, _ = _make_case(1, 2, 2, 9, 40, 16, 16, "float32", True, None, None, "", seed=7)
        out, lse = flash_forward(q, k, v, causal=True, scale=0.5)
        s = (q @ k.transpose(-1, -2)) * 0.5
        s = s.masked_fill(torch.ones(9, 40, dtype=torch.bool).triu(40 - 9 + 1), -math.inf)
        return _close("lse", lse, torch.logsumexp(s, -1), 1e-5, 1e-5)

    def ops_routes_to_triton():
        q, k, v, kw = _make_case(2, 4, 2, 20, 20, 16, 16, "float32", True, "mask", None, "", seed=8)
        a = ops.attention_with_scores(q, k, v, backend="triton", scale=0.3, **kw)
        b = ops.attention_with_scores(q, k, v, backend="native", scale=0.3, **kw)
        from tokenreduce import backends

        with backends.use_backend("attention_with_scores", "triton"):
            c = ops.attention_with_scores(q, k, v, scale=0.3, **kw)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]), "use_backend did not route to triton"
        return _close("out", a[0], b[0], 2e-5, 1e-4) + _close("scores", a[1], b[1], *TOL_SCORES)

    def nan_propagates():
        q, k, v, _ = _make_case(2, 2, 2, 5, 5, 16, 16, "float32", False, None, None, "", seed=9)
        k[1, 0, 2, 0] = float("nan")
        out, scores = attention_with_scores(q, k, v)
        ok = (torch.isnan(scores[1]).all() and torch.isfinite(scores[0]).all()
              and torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all())
        return "" if ok else f"NaN did not propagate like eager: scores {scores}"

    def deterministic():
        q, k, v, kw = _make_case(2, 4, 2, 40, 40, 16, 16, "float32", False, None, None, "", seed=10)
        a = attention_with_scores(q, k, v, config=dict(head_splits=2))
        b = attention_with_scores(q, k, v, config=dict(head_splits=2))
        return "" if torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) else "two runs differ"

    def race_dry_run():
        sys.path.insert(0, str(ROOT / "bench"))
        import race_attention

        path = Path(os.environ["RACE_OUT"])
        race_attention.main(["--dry-run", "--out", str(path)])
        report = json.loads(path.read_text())
        assert report["device"] == "cpu-interpreter" and report["rows"], report
        for row in report["rows"]:
            assert row["winner"] in ("native", "triton") and row["winner"] in row["ms"], row
            assert {"native", "triton", "triton_fwd"} <= set(row["ms"]) and not row["unavailable"], row
            assert row["max_abs_err_scores"] < 1e-4 and max(row["max_abs_err_out"].values()) < 5e-2, row
        checks = {row["checked_against"] for row in report["rows"]}
        assert checks == {"reference", "reference of the scored row"}, checks
        return ""

    def backward_raises():
        q, k, v, _ = _make_case(1, 2, 2, 5, 5, 16, 16, "float32", False, None, None, "", seed=11)
        q.requires_grad_()
        out, scores = ops.attention_with_scores(q, k, v, backend="triton")
        ref = reference.attention_with_scores(q.detach(), k, v)
        err = _close("out", out.detach(), ref[0], 2e-5, 1e-4)
        assert out.requires_grad, "out is cut from the graph"
        try:
            out.sum().backward()
        except NotImplementedError as e:
            assert "forward-only" in str(e) and "tokenreduce.attention_with_scores" in str(e), str(e)
            return err
        return "backward did not raise"

    extra("backward_raises", backward_raises)
    extra("lse_matches_logsumexp", lse_matches_logsumexp)
    extra("ops_routes_to_triton", ops_routes_to_triton)
    extra("nan_propagates", nan_propagates)
    extra("deterministic", deterministic)
    extra("race_dry_run", race_dry_run)
    return results


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    print("RESULTS " + json.dumps(_run_worker()))
    sys.exit(0)


# --------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenreduce import backends, ops  # noqa: E402

HAVE_TRITON = backends.available("attention_with_scores") == ("native", "triton")
WORKER_CHECKS = list(CASES) + ["backward_raises", "lse_matches_logsumexp", "ops_routes_to_triton", "nan_propagates",
                               "deterministic", "race_dry_run"]


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT),
               RACE_OUT=str(tmp_path_factory.mktemp("race") / "race.json"))
    env.pop("TOKENREDUCE_ATTENTION_BACKEND", None)
    proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", WORKER_CHECKS)
def test_triton_interpreter(interpreter_results, name):
    assert interpreter_results[name] == "", interpreter_results[name]


# ---- argument checks of the triton entry (no kernel launch needed) --------------------


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "args,kw,exc,needle",
    [
        ((torch.randn(1, 2, 4, 8, dtype=torch.float64),) * 3, {}, TypeError, "float64"),
        ((torch.randn(1, 3, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {}, ValueError, "multiple of k's heads"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": [4]}, IndexError, "score_rows[0] = 4"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": torch.tensor([0, -5])}, IndexError, "score_rows[1] = -5"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": [0, 1.5]}, TypeError, "score_rows must hold ints"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": []}, ValueError, "non-empty"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"score_rows": torch.tensor([0.5])}, TypeError, "int64"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {"key_bias": torch.randn(1, 4)}, ValueError, "key_bias"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), {}, ValueError, "at least one key"),
    ],
)
def test_triton_bad_input_raises(args, kw, exc, needle):
    with pytest.raises(exc, match="tokenreduce.attention_with_scores") as info:
        ops.attention_with_scores(*args, backend="triton", **kw)
    assert needle in str(info.value)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_cpu_without_interpreter_says_how():
    from tokenreduce.triton import attention_with_scores as tr

    if tr.__globals__["_INTERPRET"]:
        pytest.skip("this process runs the Triton interpreter")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tr(q, q, q)


# ---- backend selection ----------------------------------------------------------------

OP = "attention_with_scores"


@pytest.fixture
def clean_selection(monkeypatch):
    monkeypatch.delenv("TOKENREDUCE_ATTENTION_BACKEND", raising=False)
    backends.set_backend(OP, None)
    yield monkeypatch
    backends.set_backend(OP, None)


def test_default_table(clean_selection):
    assert backends.select(OP, "cpu") == "native"
    assert backends.device_key("cpu") == "cpu"
    table = backends.DEFAULTS[OP]
    assert {"cpu", "sm_80", "sm_90", "cuda"} <= set(table)
    assert set(table.values()) <= set(backends.BACKENDS[OP])


def test_precedence_argument_context_set_env(clean_selection):
    clean_selection.setenv("TOKENREDUCE_ATTENTION_BACKEND", "triton")
    assert backends.select(OP, "cpu") == "triton"
    backends.set_backend(OP, "native")
    assert backends.select(OP, "cpu") == "native"  # set_backend beats the env var
    with backends.use_backend(OP, "triton"):
        assert backends.select(OP, "cpu") == "triton"  # the context beats set_backend
        assert backends.select(OP, "cpu", "native") == "native"  # the argument beats all
        with backends.use_backend(OP, "native"):
            assert backends.get_backend(OP) == "native"
        assert backends.get_backend(OP) == "triton"
    assert backends.get_backend(OP) == "native"
    backends.set_backend(OP, None)
    assert backends.select(OP, "cpu") == "triton"
    clean_selection.setenv("TOKENREDUCE_ATTENTION_BACKEND", " Native ")
    assert backends.select(OP, "cpu") == "native"


def test_context_restores_after_an_exception(clean_selection):
    with pytest.raises(KeyError):
        with backends.use_backend(OP, "triton"):
            raise KeyError("boom")
    assert backends.get_backend(OP) is None


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: backends.set_backend(OP, "cudnn"), "unknown backend 'cudnn' (set_backend)"),
        (lambda: backends.use_backend(OP, "fast").__enter__(), "unknown backend 'fast' (use_backend)"),
        (lambda: backends.select(OP, "cpu", "trition"), "unknown backend 'trition' (backend=)"),
        (lambda: ops.attention_with_scores(*(torch.randn(1, 1, 2, 4),) * 3, backend="x"), "unknown backend 'x'"),
    ],
)
def test_unknown_backend_names_the_op(clean_selection, call, needle):
    with pytest.raises(ValueError, match="tokenreduce.attention_with_scores") as info:
        call()
    assert needle in str(info.value) and "'native', 'triton'" in str(info.value)


def test_bad_env_var_names_the_variable(clean_selection):
    clean_selection.setenv("TOKENREDUCE_ATTENTION_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="tokenreduce.attention_with_scores: unknown backend 'tritonn' "
                                         r"\(TOKENREDUCE_ATTENTION_BACKEND\)"):
        backends.select(OP, "cpu")


def test_unknown_op(clean_selection):
    with pytest.raises(ValueError, match="tokenreduce.backends: unknown op 'kcentre'"):
        backends.select("kcentre", "cpu")


def test_native_path_unchanged_and_compiles(clean_selection):
    """The default (native) path still traces with fullgraph torch.compile through the selection."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))

    def f(q, k, v):
        return ops.attention_with_scores(q, k, v, score_rows=[0])

    want = torch.ops.tokenreduce.attention_with_scores(q, k, v, 8**-0.5, False, None, torch.tensor([0]))
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_default_table_falls_back_to_native_for_float64(clean_selection):
    clean_selection.setitem(backends.DEFAULTS[OP], "cpu", "triton")
    assert backends.select(OP, "cpu", dtype=torch.bfloat16) == "triton"
    assert backends.select(OP, "cpu", dtype=torch.float64) == "native"
    assert backends.select(OP, "cpu", "triton", torch.float64) == "triton"  # explicit: kept
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out, scores = ops.attention_with_scores(q, q, q)  # the default picks triton, float64 runs native
    assert out.dtype == torch.float64 and scores.dtype == torch.float64


# ---- on a GPU: the compiled kernels against the reference (skipped without CUDA) ---------


GPU_CASES = {
    **CASES,  # plus real sizes the interpreter is too slow for
    "vit336_d80_bf16": (2, 16, 16, 577, 577, 80, 80, "bfloat16", False, None, None, ""),
    "vit336_cls_f16": (3, 16, 16, 577, 577, 64, 64, "float16", False, "mask", [0], ""),
    "gqa_causal_last_d128_bf16": (1, 8, 2, 300, 1200, 128, 128, "bfloat16", True, "mask", [-1, 0], "strided"),
    "causal_full_d96_f32": (2, 4, 4, 257, 257, 96, 96, "float32", True, None, None, ""),
}


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_cuda_matches_reference(name):
    from tokenreduce import reference
    from tokenreduce.triton import attention_with_scores

    case = GPU_CASES[name]
    q, k, v, kw = _make_case(*case, seed=2000 + list(GPU_CASES).index(name))
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    if kw["key_bias"] is not None:
        kw["key_bias"] = kw["key_bias"].cuda()
    if isinstance(kw["score_rows"], torch.Tensor):
        kw["score_rows"] = kw["score_rows"].cuda()
    config = dict(head_splits=3) if "splits" in case[-1] else None
    out, scores = attention_with_scores(q, k, v, config=config, **kw)
    rout, rscores = reference.attention_with_scores(q, k, v, **kw)
    assert out.dtype == q.dtype and scores.dtype == torch.float32
    torch.testing.assert_close(out, rout, atol=TOL_OUT[case[7]][0], rtol=TOL_OUT[case[7]][1])
    torch.testing.assert_close(scores, rscores, atol=TOL_SCORES[0], rtol=TOL_SCORES[1])
