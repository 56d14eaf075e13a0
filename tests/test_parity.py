"""Parity with ``transformers`` T5: same random weights, same outputs, both directions of checkpoint exchange.

Each case builds a tiny odd-shaped model (``conftest.odd_config``), moves it between protlm and
``transformers`` through a checkpoint directory, and compares in fp32:
- the hidden states of every encoder layer (non-padding positions only) and the decoder logits, to 1e-5;
- greedy generation (protlm's KV cache against ``generate(do_sample=False, num_beams=1)``), token for token;
- KV-cache decoding against one full decoder pass.

Note: transformers 5.x forces ``T5Config.tie_word_embeddings=True`` and therefore logs "both are present in the
checkpoints with different values, so we will NOT tie them" for every untied T5 checkpoint (Ankh, Ankh3 and
our own). That message is transformers' behaviour, not a fault of the file; the tests check the loading info
(no missing, unexpected or mis-shaped keys) and the outputs instead.
"""

from __future__ import annotations

import os

import pytest
import torch

import protlm
from tests.conftest import odd_config

transformers = pytest.importorskip("transformers")

TOL = 1e-5
# (feed_forward_proj, tie_word_embeddings): relu covers T5 v1.0 / ProtT5 (tied head with the d_model**-0.5
# rescale) and the untied relu case; the gated variants are Ankh (gelu) and Ankh2/3 (silu).
VARIANTS = [("relu", True), ("relu", False), ("gated-gelu", False), ("gated-silu", False), ("gated-gelu", True)]
VARIANT_IDS = [f"{ffn}{'-tied' if tied else ''}" for ffn, tied in VARIANTS]


# --- helpers -------------------------------------------------------------------------------------------------
def padded_batch(lengths=(13, 9, 4, 1), seed=0):
    """Random residue ids (7..26) ending in </s>, right-padded to the longest: (ids, mask), both (B, L)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(7, 27, (n - 1,), generator=g)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


def decoder_inputs(batch: int, length: int, seed=1):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randint(3, 256, (batch, length), generator=g)
    dec[:, 0] = 0  # decoder_start_token_id
    return dec


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


def assert_clean_loading(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{key}: {info[key]}"


def hf_from_protlm(model, directory, encoder_only=False):
    """Save protlm weights and load them in transformers; the loading info must be clean."""
    protlm.save_pretrained(model, directory)
    cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
    hf, info = cls.from_pretrained(directory, output_loading_info=True, attn_implementation="sdpa")
    assert_clean_loading(info)
    return hf.eval()


def hf_random(cfg, seed=3, encoder_only=False):
    """A transformers model with its own random init, built from a protlm config."""
    hf_cfg = transformers.T5Config(**cfg.to_hf_dict(encoder_only=encoder_only))
    torch.manual_seed(seed)
    cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
    hf = cls(hf_cfg).eval()
    if not encoder_only and not cfg.tie_word_embeddings:
        # transformers 5.x ties the head of every freshly built T5 (its T5Config forces
        # tie_word_embeddings=True); give the untied variants a head of their own, as Ankh checkpoints have.
        hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach().clone())
    # transformers' T5 init leaves the relative-attention tables and norms at values that hide indexing
    # bugs (norms are all ones); perturb every parameter so each one matters.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def compare_encoder(pt_model, hf_model, ids, mask):
    with torch.no_grad():
        ours = pt_model.encode(ids, mask, output_layers="all")
        enc = hf_model.encoder if hasattr(hf_model, "encoder") else hf_model
        ref = enc(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == pt_model.config.num_layers + 1
    for layer, h in ours.hidden_states.items():
        d = max_diff(h, ref.hidden_states[layer], mask)
        assert d <= TOL, f"encoder layer {layer}: max abs diff {d:.3g}"
    assert max_diff(ours.last_hidden_state, ref.last_hidden_state, mask) <= TOL


def compare_logits(pt_model, hf_model, ids, mask):
    dec = decoder_inputs(ids.shape[0], 6)
    with torch.no_grad():
        ours = pt_model(ids, mask, decoder_input_ids=dec).logits
        ref = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    d = max_diff(ours, ref)
    assert d <= TOL, f"decoder logits: max abs diff {d:.3g}"


def greedy(model, ids, mask, max_new_tokens):
    """Greedy decoding with protlm's KV cache; finished rows continue with padding, as transformers does."""
    cfg = model.config
    enc = model.encode(ids, mask).last_hidden_state
    cache = model.new_cache()
    out = torch.full((ids.shape[0], 1), cfg.decoder_start_token_id, dtype=torch.long)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        h = model.decode(out[:, -1:], enc, mask, cache=cache).last_hidden_state
        nxt = model.lm_logits(h)[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, cfg.pad_token_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == cfg.eos_token_id
        if done.all():
            break
    return out


# --- protlm -> transformers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ffn,tied", VARIANTS, ids=VARIANT_IDS)
def test_protlm_checkpoint_in_transformers(tmp_path, ffn, tied):
    cfg = odd_config(ffn, tied)
    pt = protlm.random_init(cfg, seed=1).model
    hf = hf_from_protlm(pt, tmp_path)
    ids, mask = padded_batch()
    compare_encoder(pt, hf, ids, mask)
    compare_logits(pt, hf, ids, mask)


def test_protlm_encoder_only_in_transformers(tmp_path):
    pt = protlm.random_init(odd_config("gated-gelu"), seed=2, encoder_only=True).model
    hf = hf_from_protlm(pt, tmp_path, encoder_only=True)
    ids, mask = padded_batch()
    compare_encoder(pt, hf, ids, mask)


# --- transformers -> protlm ----------------------------------------------------------------------------------
def _load_clean(directory, **kw):
    loaded = protlm.load(str(directory), **kw)  # raises CheckpointError on any missing/unexpected tensor
    return loaded.model


@pytest.mark.parametrize("ffn,tied", VARIANTS, ids=VARIANT_IDS)
def test_transformers_checkpoint_in_protlm(tmp_path, ffn, tied):
    cfg = odd_config(ffn, tied)
    hf = hf_random(cfg)
    hf.save_pretrained(tmp_path)
    pt = _load_clean(tmp_path)
    assert not pt.encoder_only
    ids, mask = padded_batch(seed=5)
    compare_encoder(pt, hf, ids, mask)
    compare_logits(pt, hf, ids, mask)


def test_transformers_encoder_only_in_protlm(tmp_path):
    cfg = odd_config("gated-silu")
    hf = hf_random(cfg, encoder_only=True)
    hf.save_pretrained(tmp_path)
    pt = _load_clean(tmp_path)
    assert pt.encoder_only and pt.decoder is None
    ids, mask = padded_batch(seed=6)
    compare_encoder(pt, hf, ids, mask)


def test_transformers_sharded_checkpoint_in_protlm(tmp_path):
    cfg = odd_config("gated-gelu")
    hf = hf_random(cfg)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in os.listdir(tmp_path) and len(shards) > 1
    pt = _load_clean(tmp_path)
    ids, mask = padded_batch(seed=7)
    compare_encoder(pt, hf, ids, mask)
    compare_logits(pt, hf, ids, mask)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pytorch_bin_checkpoint_in_protlm(tmp_path, tied):
    # transformers 5.x always writes safetensors (safe_serialization is gone); older releases and many
    # published checkpoints ship pytorch_model.bin holding the full state dict, tied copies included.
    cfg = odd_config("relu", tied)
    hf = hf_random(cfg)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    pt = _load_clean(tmp_path)
    ids, mask = padded_batch(seed=8)
    compare_encoder(pt, hf, ids, mask)
    compare_logits(pt, hf, ids, mask)


def test_roundtrip_protlm_transformers_protlm(tmp_path):
    """protlm -> transformers -> protlm gives back the very same tensors."""
    pt = protlm.random_init(odd_config("gated-silu"), seed=4).model
    hf = hf_from_protlm(pt, tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")
    back = _load_clean(tmp_path / "b")
    ref = pt.state_dict()
    got = back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# --- generation and the cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("ffn,tied", [("relu", True), ("gated-gelu", False), ("gated-silu", False)])
def test_greedy_generation_matches_transformers(tmp_path, ffn, tied):
    # initializer_factor 2: with smaller weights a random tied model just repeats its start token
    cfg = odd_config(ffn, tied, initializer_factor=2.0)
    pt = protlm.random_init(cfg, seed=11).model
    hf = hf_from_protlm(pt, tmp_path)
    ids, mask = padded_batch(seed=12)
    n_new = 12
    with torch.no_grad():
        ours = greedy(pt, ids, mask, n_new)
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n_new,
            min_new_tokens=0, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            decoder_start_token_id=cfg.decoder_start_token_id,
        )
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref), f"protlm {ours.tolist()} vs transformers {ref.tolist()}"
    # the comparison means something only if the rows generate different tokens
    assert len({tuple(r) for r in ours.tolist()}) > 1


@pytest.mark.parametrize("ffn,tied", [("relu", True), ("gated-silu", False)])
def test_kv_cache_decode_equals_full_decode(ffn, tied):
    pt = protlm.random_init(odd_config(ffn, tied), seed=13).model
    ids, mask = padded_batch(seed=14)
    dec = decoder_inputs(ids.shape[0], 9, seed=15)
    with torch.no_grad():
        enc = pt.encode(ids, mask).last_hidden_state
        full = pt.lm_logits(pt.decode(dec, enc, mask).last_hidden_state)
        cache = pt.new_cache()
        steps = []
        # uneven chunks: one token, then three at once, then the rest one by one
        bounds = [0, 1, 4] + list(range(5, dec.shape[1] + 1))
        for a, b in zip(bounds[:-1], bounds[1:]):
            h = pt.decode(dec[:, a:b], enc, mask, cache=cache).last_hidden_state
            steps.append(pt.lm_logits(h))
        assert cache.length == dec.shape[1]
    d = max_diff(torch.cat(steps, dim=1), full)
    assert d <= TOL, f"cached vs full decode: max abs diff {d:.3g}"


def test_padding_does_not_change_outputs():
    """Each row of a padded batch equals that sequence encoded alone (what length-sorted batching relies on)."""
    pt = protlm.random_init(odd_config("gated-gelu"), seed=16).model
    ids, mask = padded_batch(lengths=(17, 5, 11), seed=17)
    with torch.no_grad():
        batch = pt.encode(ids, mask, output_layers="all")
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = pt.encode(ids[row : row + 1, :n], mask[row : row + 1, :n], output_layers="all")
            for layer, h in alone.hidden_states.items():
                d = max_diff(h[0], batch.hidden_states[layer][row, :n])
                assert d <= TOL, f"row {row} layer {layer}: {d:.3g}"


def test_unpadded_batch_equals_single_sequences():
    """With no padding the mask is one (1, H, L, L) tensor broadcast over the batch; rows must stay independent."""
    pt = protlm.random_init(odd_config("gated-silu"), seed=18).model
    ids, mask = padded_batch(lengths=(10, 10, 10), seed=19)
    with torch.no_grad():
        batch = pt.encode(ids, mask, output_layers="all")
        for row in range(ids.shape[0]):
            alone = pt.encode(ids[row : row + 1], mask[row : row + 1], output_layers="all")
            for layer, h in alone.hidden_states.items():
                assert max_diff(h[0], batch.hidden_states[layer][row]) <= TOL


# --- the inference path (no autograd: in-place gating) agrees with the training path -------------------------
def test_inference_path_matches_autograd_path():
    for ffn in ("gated-gelu", "gated-silu", "relu"):
        pt = protlm.random_init(odd_config(ffn), seed=20).model
        ids, mask = padded_batch(seed=21)
        dec = decoder_inputs(ids.shape[0], 5)
        with torch.inference_mode():
            fast = pt.encode(ids, mask, output_layers="all").hidden_states
            fast_logits = pt(ids, mask, decoder_input_ids=dec).logits
        slow = pt.encode(ids, mask, output_layers="all").hidden_states
        slow_logits = pt(ids, mask, decoder_input_ids=dec).logits
        assert slow_logits.requires_grad
        for layer in slow:
            assert max_diff(fast[layer], slow[layer], mask) <= TOL
        assert max_diff(fast_logits, slow_logits) <= TOL
