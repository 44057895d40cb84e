"""TokenPacker's projector: the released checkpoint layout (mapping tested on checkpoints saved
in that layout), equality with the released formulation (nn.MultiheadAttention over the
divided windows), the LLaVA projector slot, and `tokenreduce profile --projector tokenpacker`."""
import json

import pytest
import torch
from torch import nn

from tokenreduce import cli
from tokenreduce.methods import Budget
from tokenreduce.models import presets, projectors
from tokenreduce.models.projectors import tokenpacker
from tokenreduce.profile import sweep


class ReleasedLayout(nn.Module):
    """The released projector's parameter layout and computation, written from the released
    description (CircleRadon/TokenPacker builder.py): the same parameter names, the windows
    arranged as the batch of an nn.MultiheadAttention (sequence-first), one query each."""

    def __init__(self, vision_dim, llm_dim, levels, region, heads):
        super().__init__()
        self.region = region
        self.q_proj_1 = nn.Linear(vision_dim, vision_dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(levels * vision_dim, vision_dim), nn.GELU(),
                                      nn.Linear(vision_dim, vision_dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(levels * vision_dim, vision_dim), nn.GELU(),
                                      nn.Linear(vision_dim, vision_dim))
        self.ln_q_1, self.ln_k_1, self.ln_v_1 = (nn.LayerNorm(vision_dim, eps=1e-6) for _ in range(3))
        self.clip_attn = nn.MultiheadAttention(vision_dim, heads)
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        for p in self.parameters():       # not the trained init: every tensor differs
            nn.init.normal_(p, std=0.2)

    def forward(self, x, x_multi):
        B, N, D = x.shape
        g, s = int(N ** 0.5), self.region
        gq = g // s
        key = self.ln_k_1(self.k_proj_1(x_multi))
        value = self.ln_v_1(self.v_proj_1(x_multi))
        q = torch.nn.functional.interpolate(x.reshape(B, g, g, D).permute(0, 3, 1, 2), size=(gq, gq),
                                            mode="bilinear").permute(0, 2, 3, 1).reshape(B, gq * gq, D)
        query = self.ln_q_1(self.q_proj_1(q))

        def windows(t):      # [B, g*g, C] -> [s*s, gq*gq*B, C], batch index (window row, col, b)
            C = t.shape[-1]
            t = t.reshape(B, gq, s, gq, s, C).permute(2, 4, 1, 3, 0, 5)
            return t.reshape(s * s, gq * gq * B, C)

        out = self.clip_attn(query.permute(1, 0, 2).reshape(1, gq * gq * B, D), windows(key), windows(value))[0]
        return self.mlp(out.reshape(gq * gq, B, D).permute(1, 0, 2))


def _features(B=2, g=6, D=32, levels=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, g * g, D, generator=gen), torch.randn(B, g * g, levels * D, generator=gen)


@pytest.mark.parametrize("region,heads", [(2, 4), (3, 2), (2, 1)])
def test_released_checkpoint_loads_and_matches(tmp_path, region, heads):
    torch.manual_seed(region * 10 + heads)
    authors = ReleasedLayout(32, 48, 4, region, heads)
    # a stage-1 checkpoint as the release writes it: model.mm_projector.* in mm_projector.bin
    torch.save({f"model.mm_projector.{k}": v for k, v in authors.state_dict().items()}, tmp_path / "mm_projector.bin")
    (tmp_path / "config.json").write_text(json.dumps({"scale_factor": region}))
    ours = tokenpacker.TokenPacker.from_released(str(tmp_path), heads=heads)
    assert ours.region == region and ours.weights == f"released checkpoint {tmp_path}"
    x, multi = _features()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, multi), authors(x, multi), atol=1e-5, rtol=1e-4)
    assert ours(x, multi).shape == (2, (6 // region) ** 2, 48)


def test_sharded_safetensors_checkpoint(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    authors = ReleasedLayout(32, 64, 4, 2, 4)
    proj = {f"model.mm_projector.{k}": v.contiguous() for k, v in authors.state_dict().items()}
    other = {"model.embed_tokens.weight": torch.zeros(3, 4), "lm_head.weight": torch.zeros(3, 4)}
    safetensors.save_file(other, str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.save_file(proj, str(tmp_path / "model-00002-of-00002.safetensors"))
    wmap = {**{k: "model-00001-of-00002.safetensors" for k in other},
            **{k: "model-00002-of-00002.safetensors" for k in proj}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    (tmp_path / "config.json").write_text(json.dumps({"scale_factor": 2, "hidden_size": 64}))
    ours = tokenpacker.TokenPacker.from_released(str(tmp_path), heads=4)
    x, multi = _features()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, multi), authors(x, multi), atol=1e-5, rtol=1e-4)
    # run at another region than trained: said in .weights
    assert "trained with scale_factor 2, run with region 3" in \
        tokenpacker.TokenPacker.from_released(str(tmp_path), region=3, heads=4).weights


def test_name_mapping_round_trip_and_errors(tmp_path):
    m = tokenpacker.TokenPacker(32, 48, 4, 2, heads=4)
    released = tokenpacker.local_to_released(m.state_dict())
    assert set(released) == set(ReleasedLayout(32, 48, 4, 2, 4).state_dict())
    back = tokenpacker.released_to_local(released)
    assert set(back) == set(m.state_dict()) and all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="^tokenreduce.models.projectors.tokenpacker: unexpected tensor"):
        tokenpacker.released_to_local({"nope.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        tokenpacker.TokenPacker.from_released(str(tmp_path))
    assert m.weights.startswith("random")
    with pytest.raises(ValueError, match="not a square grid whose side is a multiple of region=2"):
        m(*_features(g=5))


def test_level_layers():
    assert tokenpacker.level_layers(24) == (12, 16, 22, 23)
    assert all(1 <= l <= 3 for l in tokenpacker.level_layers(4))


def test_gradients_reach_every_parameter():
    m = tokenpacker.TokenPacker(32, 48, 4, 2, heads=4)
    x, multi = _features()
    m(x, multi).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_llava_projector_slot_tiny():
    """In a tiny LLaVA-1.5: the hooks record the multi-level features, 16 -> 4 tokens."""
    from tokenreduce.models.vlm import VLMRunner

    torch.manual_seed(0)
    model = presets.build("tiny-llava").eval()
    packer = projectors.tokenpacker_for_llava(model, 16, 4)
    assert packer.weights.startswith("random")
    own = model.model.multi_modal_projector
    model.model.multi_modal_projector = packer
    try:
        B, n_img = 2, 16
        ids = torch.cat([torch.full((B, 2), 5), torch.full((B, n_img), model.config.image_token_id),
                         torch.full((B, 3), 7)], dim=1)
        px = torch.randn(B, 3, 56, 56)
        r = VLMRunner(model, None, image_tokens=n_img)
        logits = r.next_token_logits(ids, torch.ones_like(ids), px)
        assert logits.shape[0] == B and r.last.n_img == 4 and logits.isfinite().all()
    finally:
        model.model.multi_modal_projector = own
        packer.remove()
    with pytest.raises(ValueError, match="--keep 5 does not fit 16 image tokens"):
        projectors.tokenpacker_for_llava(model, 16, 5)


def test_profile_sweep_with_tokenpacker_tiny():
    spec = sweep.Spec(model="tiny-llava", random_weights=True, methods=["visionzip"], budgets=[Budget(keep=4)],
                      projector="tokenpacker", batch=1, warmup=0, repeat=1, new_tokens=2, memory=False, threads=1)
    rep = sweep.run(spec)
    by = {r["method"]: r for r in rep["rows"]}
    assert set(by) == {"baseline", "visionzip", "tokenpacker (random weights)"}
    tp = by["tokenpacker (random weights)"]
    assert tp["error"] is None and tp["tokens_kept"] == 4 and tp["stage"] == "projector"
    assert tp["projector_weights"].startswith("random") and rep["projector_weights"].startswith("random")
    assert by["visionzip"]["tokens_kept"] == 4 and tp["projector_ms"] is not None and tp["prefill_ms"] > 0


def test_profile_cli_says_random_and_checks_flags(capsys):
    rc = cli.main(["profile", "--model", "tiny-llava", "--random-weights", "--projector", "tokenpacker",
                   "--keep", "4", "--method", "fastv", "--batch", "1", "--repeat", "1", "--warmup", "0",
                   "--new-tokens", "2", "--no-memory", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokenpacker (random" in out and "TokenPacker projector: random" in out
    for bad, msg in ((["--keep", "5"], "--keep 5 does not fit 16 image tokens"),
                     (["--ratio", "0.25"], "needs token counts"),
                     (["--keep", "4", "--projector-weights", "/no/such/dir"], "is not a folder")):
        rc = cli.main(["profile", "--model", "tiny-llava", "--random-weights", "--projector", "tokenpacker", *bad])
        out = capsys.readouterr().out
        assert rc == 2 and msg in out.replace("\n", ""), out
    rc = cli.main(["profile", "--model", "tiny-dinov2", "--random-weights", "--projector", "tokenpacker",
                   "--keep", "4"])
    assert rc == 2 and "replaces LLaVA-1.5's projector" in capsys.readouterr().out.replace("\n", "")
