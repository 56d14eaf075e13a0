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


@pytest.mark.skipif(not kernels._avx512(),
                    reason="oneDNN has no bf16 inner product below AVX-512; protlm runs F.linear there")
def test_bf16_and_no_bias():
    torch.manual_seed(1)
    x, w = torch.randn(9, 16).bfloat16(), torch.randn(12, 16).bfloat16()
    assert kernels._fast(x, w, None)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w).float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)


def test_bf16_takes_f_linear_below_avx512_even_with_onednn_forced_on(monkeypatch):
    # on an AVX2 CPU oneDNN cannot build a bf16 inner product, so the forced-on path must not be tried there
    x, w = torch.randn(9, 16).bfloat16(), torch.randn(12, 16).bfloat16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert kernels.onednn_enabled()  # the autouse fixture forced it on
    assert not kernels._fast(x, w, None) and kernels._fast(x.float(), w.float(), None) == kernels.onednn_available()
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_gated_is_the_activated_gate_times_the_up_projection():
    torch.manual_seed(2)
    gate, up = Linear(20, 33, bias=False), Linear(20, 33, bias=False)
    x = torch.randn(2, 7, 20)
    want = F.silu(gate(x)) * up(x)
    with torch.no_grad():
        torch.testing.assert_close(kernels.gated(gate, up, x, "silu"), want, atol=1e-5, rtol=1e-5)


def test_gelu_tanh_is_torch_s_tanh_gelu_to_fp32_rounding():
    # wide range: the cubic term dominates past |x| ~ 5, the left tail underflows to zero
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(5000) * 3])
    exact = 0.5 * x.double() * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x.double() + 0.044715 * x.double() ** 3)))
    with torch.no_grad():
        got = kernels.gelu_tanh(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
    # at least as close to an fp64 evaluation as torch's kernel (which loses digits in 1 + tanh(u), u << 0)
    assert (got.double() - exact).abs().max() <= (F.gelu(x, approximate="tanh").double() - exact).abs().max() + 1e-7
    assert got[x < -10].abs().max() < 1e-30


def test_gelu_tanh_leaves_gradients_half_types_and_its_input_to_torch():
    x = torch.randn(64, requires_grad=True)
    kernels.gelu_tanh(x).sum().backward()
    y = x.detach().clone().requires_grad_()
    F.gelu(y, approximate="tanh").sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    h = torch.randn(64).bfloat16()
    with torch.no_grad():
        assert torch.equal(kernels.gelu_tanh(h), F.gelu(h, approximate="tanh"))
        before = h.clone().float()
        kernels.gelu_tanh(before)
    torch.testing.assert_close(before, h.float())  # the input is not overwritten


def test_gated_off_the_onednn_path_multiplies_in_place_only_without_autograd():
    torch.manual_seed(3)
    gate, up = Linear(16, 24, bias=False), Linear(16, 24, bias=False)
    x = torch.randn(3, 5, 16)
    want = F.gelu(gate(x), approximate="tanh") * up(x)
    before = kernels.set_onednn(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(kernels.gated(gate, up, x, "gelu_tanh"), want, atol=1e-6, rtol=1e-6)
        got = kernels.gated(gate, up, x, "gelu_tanh")  # training: out of place, so the gradient is right
        got.sum().backward()
        ref_gate, ref_up = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
        ref_gate.load_state_dict(gate.state_dict()), ref_up.load_state_dict(up.state_dict())
        (F.gelu(ref_gate(x), approximate="tanh") * ref_up(x)).sum().backward()
        torch.testing.assert_close(up.weight.grad, ref_up.weight.grad)
        torch.testing.assert_close(gate.weight.grad, ref_gate.weight.grad)
    finally:
        kernels.set_onednn(before)


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


# --- attention -----------------------------------------------------------------------------------------------
@pytest.fixture
def write_out():
    before = kernels.set_write_out(True)
    yield
    kernels.set_write_out(before)


def _qkv(b=2, h=3, lq=130, lk=130, d=32, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, L, H, D) projections viewed as (B, H, L, D), as the families pass them; scores of a few units, as in a
    # trained model, so that rounding the scores to bf16 is visible
    x = torch.randn(b, lq, h, d, generator=g) * 1.5
    y = torch.randn(b, lk, 2, h, d, generator=g) * 1.5
    return x.to(dtype).transpose(1, 2), y[:, :, 0].to(dtype).transpose(1, 2), y[:, :, 1].to(dtype).transpose(1, 2)


def _masks(b=2, h=3, lq=130, lk=130):
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(b, 1, 1, lk)
    pad[1, ..., lk - 40:] = torch.finfo(torch.bfloat16).min  # the second sequence is 40 tokens shorter
    causal = torch.full((lq, lk), torch.finfo(torch.bfloat16).min).triu(1 + lk - lq)
    return {
        "none": None,
        "padding": pad,  # ESM, BERT: (B, 1, 1, Lk)
        "bias": torch.randn(1, h, lq, lk, generator=g) * 2 + pad[:1],  # T5: position bias (1, H, Lq, Lk)
        "bias-per-sequence": torch.randn(b, h, lq, lk, generator=g) * 2 + pad,
        "causal-padding": causal + pad,  # GPT-2 with padding: (B, 1, Lq, Lk)
    }


@pytest.mark.parametrize("mask_kind", ["none", "padding", "bias", "bias-per-sequence", "causal-padding"])
@pytest.mark.parametrize("lq, lk", [(130, 130), (129, 75)])
def test_written_out_attention_is_as_close_to_fp32_as_sdpa(write_out, monkeypatch, mask_kind, lq, lk):
    q, k, v = _qkv(lq=lq, lk=lk)
    mask = _masks(lq=lq, lk=lk)[mask_kind]
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                           attn_mask=None if mask is None else mask.float())
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))

    def refuse(*args, **kwargs):
        raise AssertionError("the written-out path should run here")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    out = kernels.attention(q, k, v, None if mask is None else mask.to(q.dtype))
    assert out.shape == fused.shape and out.dtype == torch.bfloat16
    # (B, H, L, D) view of (B, L, H, D): the caller's transpose-reshape is free
    assert out.transpose(1, 2).is_contiguous()
    err, err_fused = (out.float() - exact).abs(), (fused.float() - exact).abs()
    # scores rounded to bf16 cost 2-4x the fused kernel's error on average (measured 2.3-3.9x here), still
    # bf16-sized: at most 1.7% of the largest value here
    assert err.max() < 0.02 * v.abs().max() and err.mean() < 5 * err_fused.mean()


def test_head_groups_give_the_same_result_as_one_group(write_out, monkeypatch):
    q, k, v = _qkv(h=5)
    mask = _masks(h=5)["bias"].to(torch.bfloat16)
    whole = kernels.attention(q, k, v, mask)
    monkeypatch.setattr(kernels, "SCORE_BYTES", 2 * 130 * 130 * 2)  # groups of 2 heads: 2 + 2 + 1
    assert torch.equal(kernels.attention(q, k, v, mask), whole)


def test_attention_runs_sdpa_where_writing_out_does_not_apply(write_out):
    q, k, v = _qkv()
    cases = {
        "fp32": dict(q=q.float(), k=k.float(), v=v.float()),
        "short": dict(q=q[:, :, :kernels.WRITE_OUT_MIN_QUERIES - 1], k=k, v=v),
        "causal": dict(q=q, k=k, v=v, is_causal=True),
        "bool mask": dict(q=q, k=k, v=v, mask=torch.ones(2, 1, 1, 130, dtype=torch.bool)),
        "narrow heads": dict(q=q[..., :kernels.WRITE_OUT_MIN_HEAD_DIM - 1], k=k[..., :kernels.WRITE_OUT_MIN_HEAD_DIM - 1],
                             v=v),
    }
    for name, kw in cases.items():
        mask = kw.pop("mask", None)
        expected = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], attn_mask=mask,
                                                  is_causal=kw.get("is_causal", False))
        assert torch.equal(kernels.attention(kw["q"], kw["k"], kw["v"], mask,
                                             is_causal=kw.get("is_causal", False)), expected), name
    # training: gradients flow through SDPA
    qg = q.detach().clone().requires_grad_()
    kernels.attention(qg, k, v).float().sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_written_out_attention_is_on_by_default_only_where_it_pays(monkeypatch):
    for capability, on in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert kernels.write_out_pays() is on


@pytest.mark.parametrize("family", ["t5-gated-gelu", "esm", "bert", "gpt2"])
def test_every_family_in_bf16_is_as_close_to_fp32_with_written_out_attention(family, monkeypatch):
    import protlm

    from protlm.config import BertConfig, EsmConfig, GPT2Config

    from tests.conftest import odd_config

    # heads 32 wide and 140 tokens: past the minimum width (16) and the 128 queries where attention is written out
    cfg = {
        "t5-gated-gelu": odd_config(ffn="gated-gelu", d_kv=32),
        "esm": EsmConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                         max_position_embeddings=160),
        "bert": BertConfig(vocab_size=30, hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=37, max_position_embeddings=160),
        "gpt2": GPT2Config(vocab_size=40, n_embd=96, n_layer=2, n_head=3, n_positions=160),
    }[family]
    model = protlm.random_init(cfg, seed=0).model.eval()
    torch.manual_seed(3)
    ids = torch.randint(5, 20, (2, 140))
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    with torch.no_grad():
        exact = model.encoder(ids, mask).last_hidden_state
    model = model.to(torch.bfloat16)
    taken = []
    decide = kernels._writes_out
    monkeypatch.setattr(kernels, "_writes_out", lambda *a: taken.append(decide(*a)) or taken[-1])
    errors = {}
    for on in (True, False):
        before = kernels.set_write_out(on)
        try:
            with torch.no_grad():
                out = model.encoder(ids, mask).last_hidden_state.float()
        finally:
            kernels.set_write_out(before)
        errors[on] = (out - exact)[mask.bool()].abs().mean().item()
        assert any(taken) is on  # every layer's self-attention (GPT-2's through its padding mask) written out
        taken.clear()
    assert errors[True] < 1.1 * errors[False], errors  # measured: within 1% of each other
