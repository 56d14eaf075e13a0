"""ESM-2 / DPLM against transformers: layer-by-layer parity, checkpoint round trips both ways, config.json
defaults, preset sizes, and one-line errors for bad input.

Tiny odd-shaped configs (3 heads of width 12, FFN 37) with random weights in fp32: every parameter is drawn
away from its init (LayerNorm weights included), so a parameter that is read under the wrong name, or not used,
changes the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from protlm.config import HF_ESM_DEFAULTS, EsmConfig, config_from_hf_dict, preset  # noqa: E402
from protlm.convert import load, save_pretrained  # noqa: E402
from protlm.convert.checkpoint import build_model, canonical_state  # noqa: E402
from protlm.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from protlm.model.esm import ESM  # noqa: E402
from protlm.tokenizer.vocab import ESM_TOKENS, esm_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
# odd lengths; the second and third hold <mask> ("#" below), so token dropout rescales them differently
SEQS = ["MKTAYIAKQRQ", "GS#LE#V", "ACDEFGHIKLMNPQRSTVWY#", "P"]


def tiny(**kw) -> EsmConfig:
    base = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
                max_position_embeddings=40)
    return EsmConfig(**{**base, **kw})


VARIANTS = {
    "esm2-rotary": dict(),
    "esm1b-absolute": dict(position_embedding_type="absolute", emb_layer_norm_before=True),
    "no-token-dropout": dict(token_dropout=False),
}


def batch():
    """Our tokenizer's padded batch, with <mask> written where SEQS has '#'."""
    tok = esm_tokenizer()
    b = tok.batch_encode([s.replace("#", "A") for s in SEQS])
    for i, s in enumerate(SEQS):
        for j, c in enumerate(s):
            if c == "#":
                b.input_ids[i, 1 + j] = tok.mask_id
    assert (b.input_ids == tok.mask_id).any() and (b.attention_mask == 0).any()
    return b.input_ids, b.attention_mask


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter well away from its init (the padding row stays zero, as in trained ESM)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("word_embeddings.weight") or name.endswith("position_embeddings.weight"):
            pad = p[1].clone()
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            p[1] = pad
        elif p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1))


def ours(cfg: EsmConfig, encoder_only: bool = False) -> ESM:
    model = load(cfg, random_init=True, encoder_only=encoder_only).model
    scramble(model)
    return model.eval()


def hf_config(cfg: EsmConfig, **kw):
    return transformers.EsmConfig(**{**cfg.to_hf_dict(), **kw})


@torch.no_grad()
def our_outputs(model: ESM, ids, mask):
    out = model.encode(ids, mask, output_layers="all")
    logits = model.mlm_logits(out.last_hidden_state) if model.lm_head is not None else None
    return out, logits


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def assert_parity(model: ESM, hf, ids, mask) -> None:
    """Every layer 0..N-1 against transformers' hidden_states, layer N against last_hidden_state, and logits."""
    out, logits = our_outputs(model, ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n = model.encoder.n_layers
    assert sorted(out.hidden_states) == list(range(n + 1))
    assert len(ref.hidden_states) == n + 1
    last = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else None
    for layer in range(n):
        assert max_diff(out.hidden_states[layer], ref.hidden_states[layer], mask) <= TOL, f"layer {layer}"
    if last is not None:
        assert max_diff(out.hidden_states[n], last, mask) <= TOL, "final layer"
    if logits is not None:
        assert max_diff(logits, ref.logits, mask) <= TOL, "logits"
        # the final layer is what the LM head reads: compare it through the head too
        assert max_diff(model.mlm_logits(out.hidden_states[n]), ref.logits, mask) <= TOL


# --- 1. parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_transformers_masked_lm(variant):
    cfg = tiny(**VARIANTS[variant])
    hf = transformers.EsmForMaskedLM(hf_config(cfg)).eval()
    scramble(hf, seed=2)
    # transformers' own state dict (its names, its rotary buffer) builds ours: the names are the interface
    model = build_model(cfg, state=dict(hf.state_dict()), source="transformers").eval()
    ids, mask = batch()
    assert_parity(model, hf, ids, mask)
    with torch.no_grad():  # the final layer, compared to transformers' base model directly
        base = hf.esm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(our_outputs(model, ids, mask)[0].last_hidden_state, base, mask) <= TOL


def test_token_dropout_is_what_parity_checks():
    """The <mask> rescaling is visible at layer 0 (else the parity test could not catch a wrong ratio)."""
    ids, mask = batch()
    with_td = ours(tiny())
    without = build_model(tiny(token_dropout=False), state=canonical_state(with_td)).eval()
    a = our_outputs(with_td, ids, mask)[0].hidden_states[0]
    b = our_outputs(without, ids, mask)[0].hidden_states[0]
    assert max_diff(a[1:3], b[1:3], mask[1:3]) > 1e-2
    # row 0 has no <mask>: the scale (1 - 0.12) / (1 - 0) applies to every real position
    assert torch.allclose(a[0][mask[0].bool()], b[0][mask[0].bool()] * 0.88, atol=1e-6)


# --- 2. round trips -----------------------------------------------------------------------------------------
def write_vocab(directory: str, tokens=ESM_TOKENS) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(tokens) + "\n")
    return path


@pytest.mark.parametrize("encoder_only", [False, True])
def test_ours_loads_in_transformers(tmp_path, encoder_only):
    model = ours(tiny(), encoder_only=encoder_only)
    save_pretrained(model, tmp_path, esm_tokenizer())
    cls = transformers.EsmModel if encoder_only else transformers.EsmForMaskedLM
    kw = dict(add_pooling_layer=False) if encoder_only else {}
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = transformers.EsmTokenizer.from_pretrained(tmp_path)
    ids, mask = batch()
    enc = tok([s.replace("#", "<mask>") for s in SEQS], return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert_parity(model, hf.eval(), ids, mask)


@pytest.mark.parametrize("variant", ["esm2-rotary", "esm1b-absolute"])
def test_transformers_masked_lm_loads_in_protlm(tmp_path, variant):
    cfg = tiny(**VARIANTS[variant])
    hf = transformers.EsmForMaskedLM(hf_config(cfg)).eval()
    scramble(hf, seed=3)
    hf.save_pretrained(tmp_path)
    transformers.EsmTokenizer(write_vocab(str(tmp_path / "src"))).save_pretrained(tmp_path)
    pre = load(str(tmp_path))
    assert pre.model.lm_head is not None and pre.tokenizer.source.endswith("vocab.txt")
    assert pre.config.position_embedding_type == cfg.position_embedding_type
    ids, mask = batch()
    assert torch.equal(pre.tokenizer.batch_encode(["MKV", "A"]).input_ids,
                       transformers.EsmTokenizer.from_pretrained(tmp_path)(["MKV", "A"], return_tensors="pt",
                                                                          padding=True)["input_ids"])
    assert_parity(pre.model, hf, ids, mask)


def test_transformers_base_model_with_pooler_loads_encoder_only(tmp_path):
    cfg = tiny()
    hf = transformers.EsmModel(hf_config(cfg, architectures=["EsmModel"])).eval()  # with its pooler
    scramble(hf, seed=4)
    hf.save_pretrained(tmp_path)
    transformers.EsmTokenizer(write_vocab(str(tmp_path / "src"))).save_pretrained(tmp_path)
    pre = load(str(tmp_path))
    assert pre.model.encoder_only and pre.model.lm_head is None and pre.model.esm.pooler is not None
    ids, mask = batch()
    assert_parity(pre.model, hf, ids, mask)
    with pytest.raises(CheckpointError, match="no LM head"):
        load(str(tmp_path), encoder_only=False)


def _checkpoint(tmp_path, model: ESM, state: dict, config: dict | None = None, weights="pytorch_model.bin"):
    os.makedirs(tmp_path, exist_ok=True)
    torch.save(state, os.path.join(tmp_path, weights))
    with open(os.path.join(tmp_path, "config.json"), "w") as fh:
        json.dump(config or model.config.to_hf_dict(), fh)
    write_vocab(str(tmp_path))
    return str(tmp_path)


def test_old_per_layer_inv_freq_keys_load_and_are_used(tmp_path):
    model = ours(tiny())
    # older files store the table once per layer, as saved (fp16-rounded here, and visibly different)
    stored = (model.esm.rotary_embeddings.inv_freq * 1.25).half().float()
    state = dict(canonical_state(model))
    for i in range(3):
        state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = stored.clone()
    state["esm.embeddings.position_ids"] = torch.arange(40)[None]
    path = _checkpoint(tmp_path, model, state)
    pre = load(path)
    assert torch.equal(pre.model.esm.rotary_embeddings.inv_freq, stored)
    ids, mask = batch()
    a = our_outputs(pre.model, ids, mask)[0].last_hidden_state
    b = our_outputs(model, ids, mask)[0].last_hidden_state
    assert max_diff(a, b, mask) > 1e-3  # the stored table, not a recomputed one, is in use
    hf = transformers.EsmForMaskedLM.from_pretrained(path).eval()  # transformers maps the old keys too
    assert_parity(pre.model, hf, ids, mask)


def test_unused_position_table_of_published_rotary_checkpoints_is_ignored(tmp_path):
    # facebook/esm2_* files carry esm.embeddings.position_embeddings.weight (1026 x d) that rotary models never
    # read; transformers ignores it on load (huggingface/transformers#39063), so must we
    model = ours(tiny())
    state = dict(canonical_state(model), **{"esm.embeddings.position_embeddings.weight": torch.randn(40, 36)})
    pre = load(_checkpoint(tmp_path, model, state))
    ids, mask = batch()
    assert max_diff(our_outputs(pre.model, ids, mask)[1], our_outputs(model, ids, mask)[1], mask) == 0


def test_dplm_config_loads_as_dplm(tmp_path):
    model = ours(tiny())
    config = dict(model.config.to_hf_dict(), architectures=["EsmForDPLM"], dplm_type="dplm_esm")
    del config["protlm_family"]
    pre = load(_checkpoint(tmp_path, model, canonical_state(model), config, weights="pytorch_model.bin"))
    assert pre.family == "dplm"
    config.pop("dplm_type")
    config["architectures"] = ["EsmForMaskedLM"]
    assert config_from_hf_dict(config, "x").protlm_family == "esm2"


# --- 3. config.json defaults --------------------------------------------------------------------------------
SHARED_FIELDS = [f.name for f in dataclasses.fields(EsmConfig) if hasattr(transformers.EsmConfig(), f.name)]


def _same(ours_value, hf_value) -> bool:
    if hf_value is None and ours_value is False:  # emb_layer_norm_before: transformers tests it for truth
        return True
    return ours_value == hf_value and (ours_value is None) == (hf_value is None)


def test_shared_fields_cover_the_network():
    assert {"hidden_size", "num_hidden_layers", "position_embedding_type", "token_dropout", "mask_token_id",
            "pad_token_id", "layer_norm_eps", "emb_layer_norm_before", "rope_theta"} <= set(SHARED_FIELDS)


def test_hf_esm_defaults_match_transformers():
    hf = transformers.EsmConfig()
    assert {k: getattr(hf, k) for k in HF_ESM_DEFAULTS} == HF_ESM_DEFAULTS
    # every shared field but vocab_size (which transformers leaves None and protlm requires) has a default
    assert set(SHARED_FIELDS) - {"vocab_size"} <= set(HF_ESM_DEFAULTS)


@pytest.mark.parametrize("field", [f for f in SHARED_FIELDS if f != "vocab_size"])
def test_missing_key_reads_as_transformers_default(tmp_path, field):
    # a hand-written partial file: everything an ESM-2 file has except `field`
    # (48 wide in 3 heads, so that transformers' 12 heads or 768 width still give an even rotary head)
    full = {k: v for k, v in tiny(hidden_size=48).to_hf_dict().items() if k != "protlm_family"}
    del full[field]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(full))
    cfg = config_from_hf_dict(json.loads(path.read_text()), str(path))
    hf = transformers.EsmConfig.from_pretrained(tmp_path)
    assert _same(getattr(cfg, field), getattr(hf, field)), (field, getattr(cfg, field), getattr(hf, field))


def test_minimal_file_reads_as_transformers_reads_it(tmp_path):
    # rotary, so that pad_token_id None (transformers' default) is a runnable model
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "esm", "vocab_size": 33,
                                                      "position_embedding_type": "rotary"}))
    cfg = config_from_hf_dict(json.loads((tmp_path / "config.json").read_text()), "config.json")
    hf = transformers.EsmConfig.from_pretrained(tmp_path)
    for field in SHARED_FIELDS:
        assert _same(getattr(cfg, field), getattr(hf, field)), field


@pytest.mark.parametrize("kw", [dict(), dict(position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
                                              mask_token_id=32, layer_norm_eps=1e-5, hidden_dropout_prob=0.0),
                                dict(position_embedding_type="absolute", emb_layer_norm_before=True, pad_token_id=1)])
def test_files_written_by_transformers(tmp_path, kw):
    hf = transformers.EsmConfig(vocab_size=33, hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
                                intermediate_size=37, **kw)
    hf.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    if hf.position_embedding_type == "absolute" and hf.pad_token_id is None:
        # transformers' bare defaults: absolute positions counted from a pad id that is None, which transformers
        # cannot run either (its forward fails on input_ids.ne(None)); protlm says so at load time
        with pytest.raises(ConfigError, match="pad_token_id"):
            config_from_hf_dict(data, "config.json")
        return
    cfg = config_from_hf_dict(data, "config.json")
    again = transformers.EsmConfig.from_pretrained(tmp_path)
    for field in SHARED_FIELDS:
        assert _same(getattr(cfg, field), getattr(again, field)), field


def test_transformers_default_config_without_pad_runs_rotary(tmp_path):
    """pad_token_id None (transformers' default) still gives a rotary model that matches transformers (which needs
    position ids passed: it derives them from the pad id even when rotary)."""
    cfg = config_from_hf_dict({"model_type": "esm", "vocab_size": 33, "hidden_size": 36, "num_hidden_layers": 2,
                               "num_attention_heads": 3, "intermediate_size": 37, "position_embedding_type": "rotary",
                               "token_dropout": False}, "config.json")
    assert cfg.pad_token_id is None and cfg.mask_token_id is None
    hf = transformers.EsmForMaskedLM(hf_config(cfg)).eval()
    scramble(hf, seed=5)
    model = build_model(cfg, state=dict(hf.state_dict())).eval()
    ids, mask = batch()
    ids = ids.masked_fill(ids == 32, 5)  # no mask token in this vocabulary's config
    out, logits = our_outputs(model, ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None])
    assert max_diff(logits, ref.logits, mask) <= TOL


# --- 4. presets ---------------------------------------------------------------------------------------------
# (layers, hidden, heads, ffn) of facebook/esm2_*/config.json; DPLM reuses ESM-2's 150M, 650M and 3B shapes.
PUBLISHED = {
    "esm2_t6_8M": ((6, 320, 20, 1280), 8e6), "esm2_t12_35M": ((12, 480, 20, 1920), 35e6),
    "esm2_t30_150M": ((30, 640, 20, 2560), 150e6), "esm2_t33_650M": ((33, 1280, 20, 5120), 650e6),
    "esm2_t36_3B": ((36, 2560, 40, 10240), 3e9), "esm2_t48_15B": ((48, 5120, 40, 20480), 15e9),
    "dplm_150m": ((30, 640, 20, 2560), 150e6), "dplm_650m": ((33, 1280, 20, 5120), 650e6),
    "dplm_3b": ((36, 2560, 40, 10240), 3e9),
}
# The names round: the 8M model has 7.5M parameters (7.8M in the Hub file, which also stores an unused
# 1026-row position table) and the 3B one 2.84B. Those two are held to the rounding, the others to 5%.
ROUNDING = {"esm2_t6_8M": 0.07, "esm2_t36_3B": 0.06, "dplm_3b": 0.06}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_and_sizes(name):
    cfg = preset(name)
    shape, published = PUBLISHED[name]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == shape
    assert (cfg.vocab_size, cfg.position_embedding_type, cfg.token_dropout, cfg.layer_norm_eps) == (33, "rotary", True, 1e-5)
    assert cfg.protlm_family == ("dplm" if name.startswith("dplm") else "esm2")
    with torch.device("meta"):
        model = ESM(cfg)
    n = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert abs(n / published - 1) <= ROUNDING.get(name, 0.05), f"{name}: {n / 1e6:.1f}M"


# --- 5. bad input -------------------------------------------------------------------------------------------
def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "protein-gizmo", "vocab_size": 30}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'protein-gizmo' is not supported \(supported: .*esm"):
        load(str(tmp_path))


def test_residue_outside_the_vocabulary():
    with pytest.raises(InputError, match=r"prot7: unknown residue 'J' at position 3"):
        esm_tokenizer().batch_encode(["MKV", "MKJL"], records=["prot1", "prot7"])


def test_missing_and_extra_tensors(tmp_path):
    model = ours(tiny())
    state = dict(canonical_state(model))
    del state["esm.encoder.layer.1.intermediate.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) esm\.encoder\.layer\.1\.intermediate\.dense\.bias"):
        load(_checkpoint(tmp_path / "a", model, state))
    state = dict(canonical_state(model), **{"esm.encoder.layer.1.adapter.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) esm\.encoder\.layer\.1\.adapter\.weight"):
        load(_checkpoint(tmp_path / "b", model, state))


def test_hidden_size_contradicting_the_weights(tmp_path):
    model = ours(tiny())
    config = dict(model.config.to_hf_dict(), hidden_size=48, num_attention_heads=4)  # same head width
    with pytest.raises(CheckpointError, match=r"tensor esm\.\S+ has shape \(\d+, 36\), config implies \(\d+, 48\)"):
        load(_checkpoint(tmp_path, model, canonical_state(model), config))


def test_task_prefix_with_an_esm_vocabulary():
    with pytest.raises(InputError, match="has no task tokens"):
        esm_tokenizer().prefix_token_ids("nlu")


def test_vocab_txt_size_differs_from_config(tmp_path):
    model = ours(tiny())
    path = _checkpoint(tmp_path, model, canonical_state(model))
    write_vocab(path, ESM_TOKENS[:-1])
    with pytest.raises(CheckpointError, match=r"vocabulary has 32 tokens but config\.json says vocab_size 33"):
        load(path)


def test_missing_vocab_size(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size is missing"):
        config_from_hf_dict({"model_type": "esm", "position_embedding_type": "rotary"}, "config.json")


def test_absolute_positions_need_a_pad_id():
    with pytest.raises(ConfigError, match="pad_token_id"):
        config_from_hf_dict({"model_type": "esm", "vocab_size": 33}, "config.json")
