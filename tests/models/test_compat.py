"""tokenreduce.models.compat: the bridges between transformers releases (5.17 to 5.24)."""
import torch
from torch import nn

from tokenreduce.models import compat
from tokenreduce.models import presets as P


class OnlyHidden(nn.Module):      # transformers 5.17's Dinov2Layer.forward(hidden_states)
    def forward(self, hidden_states):
        return hidden_states + 1


class WithMask(nn.Module):        # 5.24's (hidden_states, attention_mask=None, **kwargs)
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        assert attention_mask is None
        return (hidden_states * 2,)


def test_run_layer_calls_either_signature():
    h = torch.ones(1, 2, 3)
    assert torch.equal(compat.run_layer(OnlyHidden(), h), h + 1)
    assert torch.equal(compat.run_layer(WithMask(), h), h * 2)


def test_dinov2_projections_and_state_dict_names():
    m = P.build("tiny-dinov2")
    layer = m.encoder.layer[0]
    q, k, v, o = compat.attention_projections(layer.attention)
    assert all(isinstance(p, nn.Linear) for p in (q, k, v, o)) and q.in_features == 64
    names = set(m.state_dict())
    as_524 = {}
    for key, t in m.state_dict().items():
        for new, old in compat.DINOV2_517_NAMES.items():
            key = key.replace(old, new)
        as_524[key] = t
    assert set(compat.dinov2_state_dict(as_524, m)) == names    # back to the installed release's names


def test_construct_on_device_in_dtype():
    torch.manual_seed(0)
    m = P.build("tiny-llava", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert torch.get_default_dtype() == torch.float32            # restored after construction
    ref = P.build("tiny-llava", dtype=torch.bfloat16)
    assert set(dict(m.named_parameters())) == set(dict(ref.named_parameters()))
