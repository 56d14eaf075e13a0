"""protlm.model.kernels: oneDNN linear layers at inference, F.linear everywhere else."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protlm.model import kernels
from protlm.model.kernels import Linear

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _onednn_on():
    """The oneDNN path on wherever torch has it, so its results are checked on any CPU (protlm itself turns it on
    only where it pays: AVX-512)."""
    before = kernels.set_onednn(True)
    yield
    kernels.set_onednn(before)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Linear(37, 23)


@pytest.mark.parametrize("activation", [None, *kernels.ACTIVATIONS])
@pytest.mark.parametrize("shape", [(5, 37), (3, 11, 37), (0, 37)])
def test_linear_matches_f_linear_and_the_activation(layer, activation, shape):
    x = torch.randn(*shape)
    want = F.linear(x, layer.weight, layer.bias)
    if activation is not None:
        want = kernels.ACTIVATIONS[activation][2](want)
    with torch.no_grad():
        got = kernels.apply(layer, x, activation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_and_no_bias():
    torch.manual_seed(1)
    x, w = torch.randn(9, 16).bfloat16(), torch.randn(12, 16).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w).float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)


def test_gated_is_the_activated_gate_times_the_up_projection():
    torch.manual_seed(2)
    gate, up = Linear(20, 33, bias=False), Linear(20, 33, bias=False)
    x = torch.randn(2, 7, 20)
    want = F.silu(gate(x)) * up(x)
    with torch.no_grad():
        torch.testing.assert_close(kernels.gated(gate, up, x, "silu"), want, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_the_fast_path_is_taken_only_at_inference_on_cpu(layer):
    x = torch.randn(4, 37)
    with torch.no_grad():
        assert kernels._fast(x, layer.weight, layer.bias)
        assert not kernels._fast(x.half(), layer.weight.half(), None)  # fp16: not a CPU fast type
        assert not kernels._fast(x.bfloat16(), layer.weight, layer.bias)  # mixed dtypes: F.linear's error
    assert not kernels._fast(x, layer.weight, layer.bias)  # grad enabled, weight requires grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._fast(x, layer.weight, layer.bias)  # autocast must see F.linear to cast it
        assert layer(x).dtype == torch.bfloat16


def test_training_gets_the_same_gradients_as_nn_linear(layer):
    ref = nn.Linear(37, 23)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(6, 37)
    kernels.apply(layer, x, "gelu").sum().backward()
    F.gelu(ref(x)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


def test_a_wrapped_layer_runs_its_own_forward(layer):
    class Doubled(nn.Module):  # stands for an adapter wrapper around the layer (LoRA adds its update in forward)
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        def forward(self, x):
            return 2 * self.base_layer(x)

    x = torch.randn(3, 37)
    with torch.no_grad():
        want = F.relu(2 * F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(kernels.apply(Doubled(layer), x, "relu"), want, atol=1e-5, rtol=1e-5)


def test_turning_onednn_off_gives_f_linear_exactly(layer):
    x = torch.randn(8, 37)
    kernels.set_onednn(False)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_the_path_is_on_by_default_only_where_it_pays(monkeypatch):
    for capability, on in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert kernels.onednn_pays() is on


def test_state_dict_is_nn_linears(layer):
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert isinstance(layer, nn.Linear)


def _families():
    from protlm.config import BertConfig, EsmConfig, GPT2Config

    from tests.conftest import odd_config

    return {
        "t5-gated-gelu": odd_config(ffn="gated-gelu"),
        "t5-relu": odd_config(ffn="relu"),
        "esm": EsmConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                         max_position_embeddings=40),
        "bert": BertConfig(vocab_size=30, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=37, max_position_embeddings=40),
        "gpt2": GPT2Config(vocab_size=40, n_embd=36, n_layer=2, n_head=3, n_positions=40),
    }


@needs_onednn
@pytest.mark.parametrize("family", ["t5-gated-gelu", "t5-relu", "esm", "bert", "gpt2"])
def test_every_family_gives_the_same_outputs_with_and_without_onednn(family):
    import protlm

    torch.manual_seed(3)
    model = protlm.random_init(_families()[family], seed=0).model.eval()
    ids = torch.randint(5, 20, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    outputs = {}
    for on in (True, False):
        kernels.set_onednn(on)
        with torch.no_grad():
            outputs[on] = model.encoder(ids, mask, output_layers="all")
    for layer, h in outputs[False].hidden_states.items():
        torch.testing.assert_close(outputs[True].hidden_states[layer], h, atol=1e-5, rtol=1e-5)
