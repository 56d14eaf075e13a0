import pytest
import torch

from protlm.errors import ConfigError
from protlm.model import T5
from protlm.model.t5 import relative_position_bucket
from tests.conftest import odd_config


def test_relative_position_buckets_by_hand():
    rel = torch.tensor([0, 1, -1, 7, -8, -127, -1000, 1000])
    # bidirectional, 32 buckets: 16 per direction, 8 exact offsets, then log-spaced up to 128
    assert relative_position_bucket(rel, True, 32, 128).tolist() == [0, 17, 1, 23, 8, 15, 15, 31]
    # causal: keys in the future share bucket 0; 16 exact offsets, then 16 + floor(ln(40/16) / ln(8) * 16) = 23
    assert relative_position_bucket(torch.tensor([5, 0, -5, -40]), False, 32, 128).tolist() == [0, 0, 5, 23]


def test_padding_does_not_change_real_positions():
    model = T5(odd_config()).eval()
    ids = torch.randint(7, 27, (1, 13))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 13), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        a = model.encode(ids).last_hidden_state
        b = model.encode(padded, mask).last_hidden_state[:, :13]
    assert torch.allclose(a, b, atol=1e-6)


def test_output_layers_numbering():
    model = T5(odd_config()).eval()
    ids = torch.randint(7, 27, (2, 9))
    with torch.no_grad():
        out = model.encode(ids, output_layers="all")
        sel = model.encode(ids, output_layers=[-1, 0, 2])
    assert sorted(out.hidden_states) == [0, 1, 2, 3]
    assert torch.equal(out.hidden_states[3], out.last_hidden_state)
    assert torch.equal(out.hidden_states[0], model.shared(ids))
    assert sorted(sel.hidden_states) == [0, 2, 3]
    with pytest.raises(ConfigError, match="layer 4 is out of range for a 3-layer encoder"):
        model.encode(ids, output_layers=[4])


def test_tied_head_rescales():
    model = T5(odd_config("relu", tied=True)).eval()
    h = torch.randn(1, 2, 40)
    assert torch.allclose(model.lm_logits(h), (h * 40 ** -0.5) @ model.shared.weight.T, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    model = T5(odd_config()).eval()
    ids = torch.randint(7, 27, (2, 17))
    with torch.no_grad():
        ref = model.encode(ids).last_hidden_state
        half = model.to(dtype).encode(ids).last_hidden_state
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() < 0.1


def test_loss_ignores_padding_labels():
    model = T5(odd_config()).eval()
    ids = torch.randint(7, 27, (2, 11))
    labels = torch.randint(7, 27, (2, 5))
    labels[1, 3:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = out.logits
    manual = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert torch.allclose(out.loss, manual, atol=1e-6)
