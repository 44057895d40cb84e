import pytest
import torch

from tokenreduce import ops
from tokenreduce.methods import Context, build
from tokenreduce.methods.cdpruner import instruction_relevance
from tokenreduce.testing.authors.cdpruner import cdpruner, cdpruner_relevance, fast_map_dpp
from tokenreduce.testing.synthetic import clip_like


def text_of(B, T, D, seed):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors(B):
    """The authors' encode_images (per sample, their batch of one) with ctx.x standing for both
    the image features and the image embeds, ctx.text for the text embeds."""
    x = clip_like(B, 576, 1024, seed=31, layers=()).x
    text = text_of(B, 12, 1024, 32)
    red = build("cdpruner", keep=64)(Context(x=x, has_cls=True, text=text))
    picks = cdpruner(x[:, 1:], x[:, 1:], text, 64)
    assert torch.equal(red.index[:, 0], torch.zeros(B, dtype=torch.long))   # [CLS] first
    assert torch.equal(red.index[:, 1:] - 1, picks)                          # spatial order
    torch.testing.assert_close(red.tokens[:, 1:], x[:, 1:].gather(1, picks[..., None].expand(-1, -1, 1024)))


def test_relevance_is_the_authors():
    x = clip_like(2, 100, 64, seed=33, layers=()).x
    text = text_of(2, 5, 64, 34)
    ours = instruction_relevance(x, text)
    for b in range(2):
        torch.testing.assert_close(ours[b], cdpruner_relevance(x[b:b + 1], text[b])[0])
    theta = 0.5
    torch.testing.assert_close(instruction_relevance(x, text, theta),
                               torch.exp(theta / (2 * (1 - theta)) * ours))


def test_without_usable_text_is_the_unconditional_dpp():
    """No ctx.text, or text of another width (LLaVA's projector stage: CLIP 1024 vs LLM 4096):
    relevance 1 (pinned: the deviation the method documents)."""
    x = clip_like(2, 576, 1024, seed=35, layers=()).x[:, 1:]
    m = build("cdpruner", keep=32)
    plain = torch.sort(ops.dpp_select(x, 32)[0]).values
    assert torch.equal(m(Context(x=x)).index, plain)
    assert torch.equal(m(Context(x=x, text=text_of(2, 7, 4096, 36))).index, plain)


def test_batch_low_precision_and_ratio():
    x = clip_like(3, 576, 1024, seed=37, layers=()).x[:, 1:]
    text = text_of(3, 9, 1024, 38)
    m = build("cdpruner", ratio=0.25)
    full = m(Context(x=x, text=text))
    assert full.tokens.shape == (3, 144, 1024)
    for b in range(3):
        assert torch.equal(m(Context(x=x[b:b + 1], text=text[b:b + 1])).index[0], full.index[b])
    for dt in (torch.float16, torch.bfloat16):
        low = m(Context(x=x.to(dt), text=text.to(dt)))
        overlap = (low.index[:, :, None] == full.index[:, None, :]).any(-1).float().mean()
        assert overlap > 0.8  # near-ties may flip in 16-bit inputs


def test_theta_option():
    x = clip_like(1, 200, 64, seed=39, layers=()).x[:, 1:]
    text = text_of(1, 4, 64, 40)
    red = build("cdpruner", keep=20, theta=0.5)(Context(x=x, text=text))
    rel = instruction_relevance(x, text, 0.5)
    assert torch.equal(red.index, torch.sort(fast_map_dpp(x, rel, 20)).values)


def test_errors():
    with pytest.raises(ValueError, match="cdpruner.*budget"):
        build("cdpruner")
    with pytest.raises(TypeError, match="cdpruner.*unknown option"):
        build("cdpruner", keep=4, colour="red")
    with pytest.raises(ValueError, match="cdpruner.*theta"):
        build("cdpruner", keep=4, theta=1.0)
    with pytest.raises(ValueError, match="cdpruner.*ctx.x"):
        build("cdpruner", keep=4)(Context(x=torch.zeros(4, 8)))
