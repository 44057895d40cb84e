"""VLA-Pruner: against the authors' per-episode code (MINT-SJTU/VLA-Pruner, re-implemented in
tokenreduce.testing.authors.vla_pruner) over streams of frames, the temporal state (what
carries from frame to frame, reset rules), inside a tiny LLaVA over frames (the decode-row
attention from the fused op), and `tokenreduce profile --frames`."""
import json
import os
import sys

import pytest
import torch

from tokenreduce import cli, methods
from tokenreduce.methods import Context
from tokenreduce.methods.vla_pruner import dual_level_select, temporal_guide
from tokenreduce.testing.authors import vla_pruner as authors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from _vlm_inputs import vlm_inputs  # noqa: E402


def _same(ours, theirs):
    return all(torch.equal(ours[b], theirs[b]) for b in range(len(theirs)))


@pytest.mark.parametrize("B,N,D,keep,window", [(1, 256, 32, 64, 3), (3, 64, 16, 16, 3), (2, 100, 8, 30, 2)])
def test_matches_the_authors_over_a_stream(B, N, D, keep, window):
    frames = authors.stream(B, N, D, 7, seed=N)
    ours = authors.run_ours(frames, keep, window=window)
    theirs = authors.run_authors(frames, keep, window=window)
    for t, (o, w) in enumerate(zip(ours, theirs)):
        assert _same(o, w), f"frame {t}"


def test_full_warmup_as_the_authors():
    frames = authors.stream(2, 64, 16, 5, seed=3)
    ours = authors.run_ours(frames, 16, warmup="full")
    theirs = authors.run_authors(frames, 16, full_warmup=True)
    assert [o.shape[1] for o in ours] == [64, 64, 64, 16, 16]
    for o, w in zip(ours, theirs):
        assert _same(o, w)


def test_guide_weights_and_union_of_one_set():
    h = torch.stack([torch.full((1, 4), 1.0), torch.full((1, 4), 2.0)])          # oldest, newest
    h[1, 0, 0] = 10.0
    g = temporal_guide(h, 0.5)                  # the authors' order: oldest 1, newest 0.5
    torch.testing.assert_close(g, (h[0] + 0.5 * h[1]) / (h[0] + 0.5 * h[1]).sum())
    g2 = temporal_guide(h, 0.5, "recent")
    torch.testing.assert_close(g2, (0.5 * h[0] + h[1]) / (0.5 * h[0] + h[1]).sum())
    # both criteria agree: the union is the top-k itself
    x = torch.randn(2, 32, 8)
    s = torch.softmax(torch.randn(2, 32), -1)
    got = dual_level_select(x, s, s, 5).sort(1).values
    assert torch.equal(got, s.topk(5).indices.sort(1).values)


def _frame(m, x, sem):
    return m(Context(x=x, attn_received={m.K - 1: sem}, layer=m.K - 1, num_layers=32))


def test_state_carry_and_reset_rules():
    frames = authors.stream(3, 64, 16, 6, seed=9)
    m = methods.build("vla-pruner", keep=16)
    for x, sem, act in frames[:4]:
        _frame(m, x, sem)
        m.observe_decode(15, act)
        m.end_frame()
    assert m.frames == 4 and m.filled.tolist() == [3, 3, 3] and m.history.shape == (3, 3, 64)
    torch.testing.assert_close(m.history[-1], frames[3][2])          # the newest frame last
    x, sem, _ = frames[4]
    dual = _frame(m, x, sem).index
    semantic = sem.topk(16).indices.sort(1).values
    # reset of stream 1 only: it is back in warm-up (semantic top-k), the others keep their state
    m.reset(torch.tensor([False, True, False]))
    assert m.filled.tolist() == [3, 0, 3] and (m.history[:, 1] == 0).all()
    red = _frame(m, x, sem).index
    assert torch.equal(red[1], semantic[1]) and torch.equal(red[0], dual[0]) and torch.equal(red[2], dual[2])
    # full reset: every stream starts afresh
    m.reset()
    assert m.history is None and m.frames == 0
    assert torch.equal(_frame(m, x, sem).index, semantic)
    # another stream shape starts afresh too
    for x, sem, act in frames[:3]:
        _frame(m, x, sem)
        m.observe_decode(15, act)
        m.end_frame()
    x2, sem2 = torch.randn(2, 64, 16), torch.softmax(torch.randn(2, 64), -1)
    assert torch.equal(_frame(m, x2, sem2).index, sem2.topk(16).indices.sort(1).values) and m.history is None
    # deterministic
    a = authors.run_ours(frames, 16)
    b = authors.run_ours(frames, 16)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_in_a_tiny_llava_over_frames():
    from tokenreduce.models import presets, vlm
    model = presets.build("tiny-llava")
    m = methods.build("vla-pruner", keep=4, layer=2, action_layer=3)   # prune before layer 2, observe layer 3
    batch, n = vlm_inputs("tiny-llava", model)
    seen = []
    observe = m.observe_decode
    m.observe_decode = lambda layer, a: (seen.append(a.clone()), observe(layer, a))
    for t in range(5):
        r = vlm.VLMRunner(model, m)
        px = batch["pixel_values"].roll(t, 0)
        ids = r.generate(max_new_tokens=3, **{**batch, "pixel_values": px})
        assert ids.shape == (2, 3) and r.llm_reducer.steps[-1]["tokens_out"] == 4
        assert not r.llm_reducer.rec.fallbacks and r.llm_reducer.rec.calls["fused"] > 0
    assert len(seen) == 5 * 3                           # prefill row + 2 decoding steps per frame
    for a in seen:                                      # layer 3 sees only the 4 kept image tokens
        assert a.shape == (2, n) and ((a > 0).sum(1) == 4).all() and (a >= 0).all()
    assert m.frames == 4 and m.filled.tolist() == [3, 3]     # the last frame closes at the next request


def test_profile_frames(tmp_path, capsys):
    j = tmp_path / "r.json"
    rc = cli.main(["profile", "--model", "tiny-llava", "--random-weights", "--method", "vla-pruner", "--keep", "4",
                   "--frames", "4", "--batch", "2", "--repeat", "1", "--warmup", "0", "--threads", "1",
                   "--new-tokens", "2", "--no-memory", "--json", str(j)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads(j.read_text())
    assert rep["frames"] == 4
    row = [r for r in rep["rows"] if r["method"] == "vla-pruner"][0]
    assert row["error"] is None and row["tokens_kept"] == 4
    assert cli.main(["profile", "--model", "tiny-llava", "--random-weights", "--frames", "0"]) == 2
    assert "--frames must be an int >= 1" in capsys.readouterr().out


def test_profile_frames_fill_the_state():
    from tokenreduce.models import presets
    from tokenreduce.profile import inputs, runner
    model = presets.build("tiny-llava")
    inp = inputs.vlm_inputs(model, "llava", 56, inputs.load_batch(2), "hi")
    w = runner.VLMWorkload(model, inp, new_tokens=2, frames=4)
    m = methods.build("vla-pruner", keep=4)
    w.call(m, runner.Timeline(torch.device("cpu")))
    assert m.frames == 3 and m.filled.tolist() == [3, 3]    # the timed frame had a full window
    w.call(m, runner.Timeline(torch.device("cpu")))
    assert m.frames == 3                                    # each call replays its stream from a reset


def test_bad_input():
    for kw, msg in (({"gamma": 0}, r"gamma must be in \(0, 1\]"), ({"semantic": "text"}, "semantic must be one of"),
                    ({"warmup": "x"}, "warmup must be one of"), ({"decay_order": "x"}, "decay_order must be one of"),
                    ({"layer": 0}, "layer must be an int >= 1"), ({"window": 0}, "window must be an int >= 1")):
        with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.vla-pruner: " + msg):
            methods.build("vla-pruner", **kw)
    m = methods.build("vla-pruner", keep=4)
    with pytest.raises(ValueError, match=r"needs ctx\.attn_received\[2\]"):
        m(Context(x=torch.randn(1, 16, 4), layer=2))
    with pytest.raises(ValueError, match=r"observe_decode wants \[B, N\]"):
        m.observe_decode(15, torch.zeros(16))
    with pytest.raises(ValueError, match="layer K=40 exceeds the 32 LLM layers"):
        methods.build("vla-pruner", layer=40).reduce_layers(32)
    full = methods.build("vla-pruner", keep=4, warmup="full")
    full.observe_decode(15, torch.zeros(1, 16))
    full.end_frame()
    with pytest.raises(ValueError, match="resets all streams together"):
        full.reset(torch.tensor([True]))
    last = methods.build("vla-pruner", keep=4, semantic="last")
    assert methods.Need.QUERY_ATTN in last.needs
    assert last(Context(x=torch.randn(1, 16, 4), query_attn={2: torch.rand(1, 16)}, layer=2)).tokens.shape == (1, 4, 4)


def test_dual_level_path_has_no_host_traffic():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from host_traffic import DEVICE, no_host_traffic
    m = methods.build("vla-pruner", keep=64)
    with no_host_traffic():
        for _ in range(3):
            for _ in range(4):
                m.observe_decode(15, torch.rand(2, 256, device=DEVICE))
            m.end_frame()
        red = m(Context(x=torch.randn(2, 256, 32, device=DEVICE), attn_received={2: torch.rand(2, 256, device=DEVICE)},
                        layer=2, num_layers=32))
        m.reset(torch.ones(2, dtype=torch.bool, device=DEVICE))
    assert red.tokens.shape == (2, 64, 32) and m.frames == 3


def test_redundancy_on_the_llm_input_embeddings():
    """Inside the LLM runner the redundancy pass reads the LLM's input at the image tokens (the
    authors' inputs_embeds), not the hidden states of layer K-1."""
    from tokenreduce.models import presets, vlm
    model = presets.build("tiny-llava")
    m = methods.build("vla-pruner", keep=4, layer=2, window=1)
    batch, n = vlm_inputs("tiny-llava", model)
    got = {}
    inner = m.reduce

    def reduce(ctx):
        got["emb"], got["x"] = ctx.state.get("input_embeddings"), ctx.x
        return inner(ctx)
    m.reduce = reduce
    for _ in range(2):
        vlm.VLMRunner(model, m).generate(max_new_tokens=2, **batch)
    r = vlm.VLMRunner(model, m)
    p = r.prepare(**batch)
    img = p.inputs_embeds[p.is_img].view(2, n, -1)
    torch.testing.assert_close(got["emb"], img)
    assert not torch.allclose(got["emb"], got["x"])
