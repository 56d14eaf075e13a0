"""BERT (ProtBERT) against transformers: layer-by-layer parity, checkpoint round trips both ways (tokenizer files
included), ProtBERT's token convention, masked marginals, per-residue embeddings, config.json defaults, presets
and one-line errors.

Tiny odd-shaped configs (3 heads of width 12, FFN 37) with random weights in fp32: every parameter is drawn away
from its init (LayerNorm weights and the token-type table included), so a parameter that is read under the wrong
name, or not used, changes the outputs.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import protlm  # noqa: E402
from protlm.config import HF_BERT_DEFAULTS, BertConfig, config_from_hf_dict, preset  # noqa: E402
from protlm.convert import load, save_pretrained  # noqa: E402
from protlm.convert.checkpoint import build_model  # noqa: E402
from protlm.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from protlm.generation import score_variants  # noqa: E402
from protlm.model.bert import BERT  # noqa: E402
from protlm.tokenizer.vocab import BERT_TOKENS, prot_bert_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
# odd lengths; "#" marks <mask>; U/Z/O/B are ProtBERT's rare residues (read as X)
SEQS = ["MKTAYIAKQRQ", "GS#LE#V", "ACDEFGHIKLMNPQRSTVWYUZOB#", "P"]
STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def tiny(**kw) -> BertConfig:
    base = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
                max_position_embeddings=40, protlm_family="prot-bert")
    return BertConfig(**{**base, **kw})


def hf_config(cfg: BertConfig, **kw):
    return transformers.BertConfig(**{**cfg.to_hf_dict(), **kw})


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter well away from its init (the padding row stays zero, as in trained BERTs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
        if name.endswith("word_embeddings.weight"):
            p[0] = 0


def batch(tok):
    """Our tokenizer's padded batch, with [MASK] written where SEQS has '#'."""
    b = tok.batch_encode([s.replace("#", "A") for s in SEQS])
    for i, s in enumerate(SEQS):
        for j, c in enumerate(s):
            if c == "#":
                b.input_ids[i, 1 + j] = tok.mask_id
    assert (b.input_ids == tok.mask_id).any() and (b.attention_mask == 0).any()
    return b.input_ids, b.attention_mask


def max_diff(a, b, mask) -> float:
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def assert_parity(model: BERT, hf, ids, mask) -> None:
    """Layers 0..N against transformers' hidden_states (N is the last block: post-LN has no final norm), and the
    logits."""
    with torch.no_grad():
        out = model.encode(ids, mask, output_layers="all")
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n = model.encoder.n_layers
    assert sorted(out.hidden_states) == list(range(n + 1)) and len(ref.hidden_states) == n + 1
    for layer in range(n + 1):
        assert max_diff(out.hidden_states[layer], ref.hidden_states[layer], mask) <= TOL, f"layer {layer}"
    assert torch.equal(out.hidden_states[n], out.last_hidden_state)
    if model.cls is not None:
        with torch.no_grad():
            assert max_diff(model.mlm_logits(out.last_hidden_state), ref.logits, mask) <= TOL, "logits"
    else:
        assert max_diff(out.last_hidden_state, ref.last_hidden_state, mask) <= TOL


def ours(cfg: BertConfig, encoder_only: bool = False) -> BERT:
    model = load(cfg, random_init=True, encoder_only=encoder_only).model
    scramble(model)
    return model.eval()


# --- parity and round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_transformers_masked_lm_loads_in_protlm(tmp_path, act):
    cfg = tiny(hidden_act=act)
    hf = transformers.BertForMaskedLM(hf_config(cfg)).eval()
    scramble(hf, seed=2)
    hf.save_pretrained(tmp_path)
    prot_bert_tokenizer().save(tmp_path)
    transformers.BertTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path)  # its own tokenizer files
    pre = load(tmp_path)
    assert isinstance(pre.model, BERT) and pre.model.kind == "masked-lm" and not pre.model.encoder_only
    assert pre.config.protlm_family == "prot-bert" and pre.config.hidden_act == act
    assert_parity(pre.model, hf, *batch(pre.tokenizer))


@pytest.mark.parametrize("encoder_only", [False, True])
def test_ours_loads_in_transformers(tmp_path, encoder_only):
    model = ours(tiny(), encoder_only=encoder_only)
    save_pretrained(model, tmp_path, prot_bert_tokenizer())
    cls = transformers.BertModel if encoder_only else transformers.BertForMaskedLM
    kw = dict(add_pooling_layer=False) if encoder_only else {}
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager", **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_parity(model, hf.eval(), *batch(prot_bert_tokenizer()))
    back = load(tmp_path)  # and back into protlm, tie included
    assert back.model.encoder_only == encoder_only
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k


def test_base_model_with_pooler_loads_encoder_only(tmp_path):
    hf = transformers.BertModel(hf_config(tiny())).eval()  # add_pooling_layer=True: bert.pooler.* in the file
    scramble(hf, seed=3)
    hf.save_pretrained(tmp_path)
    prot_bert_tokenizer().save(tmp_path)
    pre = load(tmp_path)
    assert pre.model.encoder_only and pre.model.bert.pooler is not None
    assert_parity(pre.model, hf, *batch(pre.tokenizer))
    with pytest.raises(CheckpointError, match="no MLM head"):
        load(tmp_path, encoder_only=False)


def test_old_files_with_decoder_bias_buffers_and_nsp_head_load(tmp_path):
    """transformers 4.x's files store cls.predictions.decoder.bias, the index buffers, and (BertForPreTraining)
    the next-sentence head; the decoder bias must be the one that is used."""
    from safetensors.torch import load_file, save_file

    model = ours(tiny())
    save_pretrained(model, tmp_path, prot_bert_tokenizer())
    state = load_file(tmp_path / "model.safetensors")
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]
    state["cls.seq_relationship.weight"] = torch.zeros(2, 36)
    state["cls.seq_relationship.bias"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    back = load(tmp_path).model
    ids, mask = batch(prot_bert_tokenizer())
    with torch.no_grad():
        assert torch.equal(back(ids, mask), model(ids, mask))


# --- ProtBERT's tokens -----------------------------------------------------------------------------------------
def test_tokens_equal_bert_tokenizer_with_the_model_cards_preprocessing(tmp_path):
    prot_bert_tokenizer().save(tmp_path)
    hf_tok = transformers.BertTokenizer.from_pretrained(tmp_path, do_lower_case=False)
    ours_tok = load(_tiny_checkpoint(tmp_path)).tokenizer  # read back from the checkpoint's vocab.txt
    for seq in ["MKTAYIAKQRQ", "ACDEFGHIKLMNPQRSTVWYUZOBX"]:
        card = " ".join(re.sub(r"[UZOB]", "X", seq))  # Rostlab/prot_bert's model card
        assert ours_tok.encode(seq) == hf_tok(card)["input_ids"]
        assert ours_tok.encode(" ".join(seq)) == hf_tok(card)["input_ids"]  # space-separated input is read too
    assert [ours_tok.bos_id, ours_tok.eos_id, ours_tok.mask_id, ours_tok.pad_id] == [
        hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id, hf_tok.pad_token_id]


def test_esm_specials_keep_working():
    from protlm.tokenizer.vocab import esm_tokenizer

    tok = esm_tokenizer()
    assert [tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id] == [tok.vocab[t] for t in ("<cls>", "<eos>", "<mask>", "<pad>")]
    assert not tok.is_bert and prot_bert_tokenizer().is_bert


def _tiny_checkpoint(path):
    save_pretrained(ours(tiny()), path, prot_bert_tokenizer())
    return path


# --- workflows -------------------------------------------------------------------------------------------------
def test_masked_marginals_equal_transformers(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    pre = load(path, dtype="fp32")
    hf = transformers.BertForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = pre.tokenizer
    wt, variants = "MKTAYIAKQRQISFVKSHF", ["A4G", "K2R:A4G", "WT", "Q11W"]
    direct = []
    for v in variants:
        total = 0.0
        for m in protlm.generation.parse_variant(v, wt).mutations:
            ids = [tok.bos_id, *[tok.mask_id if i == m.position else tok.vocab[c] for i, c in enumerate(wt)], tok.eos_id]
            with torch.no_grad():
                lp = hf(input_ids=torch.tensor([ids])).logits[0, 1 + m.position].double().log_softmax(-1)
            total += float(lp[tok.vocab[m.mut]] - lp[tok.vocab[m.wt]])
        direct.append(total)
    got = score_variants(pre, wt, variants, strategy="masked-marginal")
    assert np.abs(got - direct).max() <= 1e-5 and np.abs(direct).max() > 0.1


def test_embed_gives_one_row_per_residue_without_cls_and_sep(tmp_path):
    pre = load(_tiny_checkpoint(tmp_path), dtype="fp32")
    seqs = {"a": "MKTAYIAKQRQ", "b": "GSU", "c": "P"}
    got = protlm.embed(pre, seqs, per_residue=True, dtype="fp32")
    tok = pre.tokenizer
    for k, s in seqs.items():
        assert got[k].shape == (len(s), 36)
        ids = torch.tensor([tok.encode(s)])
        with torch.no_grad():
            ref = pre.model.encode(ids, torch.ones_like(ids)).last_hidden_state[0, 1:-1]  # [CLS] and [SEP] dropped
        assert np.abs(got[k] - ref.numpy()).max() <= TOL


def test_too_long_input_is_refused_in_one_line():
    model = ours(tiny())
    with pytest.raises(InputError, match="40 learned positions"):
        model(torch.zeros(1, 41, dtype=torch.long))
    assert model.max_residues == 38


# --- configs ---------------------------------------------------------------------------------------------------
def test_hf_bert_defaults_match_transformers():
    ref = transformers.BertConfig()
    for key, value in HF_BERT_DEFAULTS.items():
        assert getattr(ref, key) == value, key


def test_prot_bert_config_without_model_type_reads_as_bert(tmp_path):
    """Rostlab/prot_bert's config.json as published: no model_type, no layer_norm_eps, no pad_token_id."""
    data = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
            "max_position_embeddings": 40000, "num_attention_heads": 16, "num_hidden_layers": 30,
            "type_vocab_size": 2, "vocab_size": 30}
    cfg = config_from_hf_dict(data, "config.json")
    ref = transformers.BertConfig(**data)
    assert isinstance(cfg, BertConfig) and cfg.protlm_family == "prot-bert"
    assert (cfg.layer_norm_eps, cfg.pad_token_id) == (ref.layer_norm_eps, ref.pad_token_id)
    assert cfg == preset("prot_bert", initializer_range=0.02)


def test_files_written_by_transformers_read_back(tmp_path):
    transformers.BertConfig(**tiny().to_hf_dict()).save_pretrained(tmp_path)
    cfg = config_from_hf_dict(json.loads((tmp_path / "config.json").read_text()), "config.json")
    assert cfg == tiny()


def test_prot_bert_preset_size():
    with torch.device("meta"):
        model = BERT(preset("prot_bert"))
    n = sum(p.numel() for p in model.bert.parameters())
    # ProtBERT: ~420M parameters (ProtTrans); the 40000-position table alone is 41M
    assert 415e6 < n < 425e6, n
    assert len(BERT_TOKENS) == preset("prot_bert").vocab_size


def test_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="relative_key"):
        BertConfig(position_embedding_type="relative_key")
    with pytest.raises(ConfigError, match="hidden_act"):
        BertConfig(hidden_act="quick_gelu")
    with pytest.raises(ConfigError, match="is_decoder"):
        config_from_hf_dict({"model_type": "bert", "is_decoder": True}, "config.json")
    path = _tiny_checkpoint(tmp_path)
    (path / "vocab.txt").write_text("\n".join(BERT_TOKENS[:-1]) + "\n")
    with pytest.raises(CheckpointError, match="29 tokens but config.json says vocab_size 30"):
        load(path)


def test_build_model_accounts_for_every_tensor():
    model = ours(tiny())
    state = dict(model.state_dict())
    state.pop("bert.encoder.layer.1.output.LayerNorm.weight")
    with pytest.raises(CheckpointError, match="missing tensor"):
        build_model(tiny(), state=state)


def test_depth_analysis_and_truncation_run_on_bert():
    """Masked-LM depth analysis runs unchanged; a cut after block K outputs the full model's layer K (post-LN: no
    final norm to apply), and the block updates add up to the block's output."""
    import os

    from protlm.analysis import DepthOptions, analyze_depth, truncate_encoder

    from .conftest import DATA

    pre = load(tiny(), random_init=True, seed=0)
    scramble(pre.model)
    report = analyze_depth(pre, os.path.join(DATA, "ecoli_k12_excerpt.fasta"),
                           DepthOptions(max_length=30, probe_task=None), max_proteins=3)
    assert report is not None
    ids, mask = batch(pre.tokenizer)
    cut = truncate_encoder(pre.model, 2)
    with torch.no_grad():
        full = pre.model.encode(ids, mask, output_layers=[1, 2])
        assert torch.equal(cut.encode(ids, mask).last_hidden_state, full.hidden_states[2])
        ctx = pre.model.bert.self_mask(mask, ids.shape[1], ids.shape[1], 0, torch.float32)
        out = pre.model.bert.block[1](full.hidden_states[1], ctx, return_updates=True)
        assert torch.allclose(full.hidden_states[1] + out.attn_update + out.ffn_update, out.hidden, atol=1e-6)
        assert torch.equal(out.hidden, full.hidden_states[2])


def test_info_describes_bert(tmp_path):
    from protlm.cli.info import describe

    rows = dict(describe(load(_tiny_checkpoint(tmp_path))))
    assert "layers=3 (post-LN)" in rows["shape"] and "up to 38 residues" in rows["windows"]
    assert "[CLS] 2, [SEP] 3, [MASK] 4, [PAD] 0" in rows["vocabulary"]
