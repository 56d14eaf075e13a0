"""Depth analysis of a masked LM (ESM-2 architecture) on tiny odd-shaped random models: the T5 checks of
``test_analysis.py`` that matter, through the model protocol, plus what is new for a masked LM (``<mask>`` input,
the LM head as the output, CKA on the clean input, no decoder anywhere)."""

import json
import os

import numpy as np
import pytest
import torch

import protlm
from protlm.analysis import DepthOptions, analyze_depth, truncate_encoder
from protlm.analysis.blocks import StackRunner
from protlm.analysis.inputs import batches, prepare_proteins, read_proteins
from protlm.analysis.metrics import linear_cka_matrix, row_mean
from protlm.config import EsmConfig
from protlm.errors import ConfigError

from .conftest import DATA

FASTA = os.path.join(DATA, "ecoli_k12_excerpt.fasta")
PROBE_DATA = os.path.join(DATA, "ssp3_flip_excerpt")
FAST = dict(max_length=48, probe_task=None)


def _esm(seed=0, encoder_only=False, **kw):
    cfg = EsmConfig(**{**dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37), **kw})
    pre = protlm.convert.load(cfg, random_init=True, seed=seed, encoder_only=encoder_only)
    if not encoder_only:  # BERT init (std 0.02) gives a near-uniform head; a wider one makes top-1 meaningful
        with torch.no_grad():
            pre.model.lm_head.dense.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return pre


def _zero_block(layer):
    """Zero the output projections of both sublayers: the block then adds nothing to the residual stream."""
    with torch.no_grad():
        for dense in (layer.attention.output.dense, layer.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()


def _run(pre, n=6, **opts):
    return analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts}), max_proteins=n)


def _batch(pre, n=4, rate=0.15, length=100):
    tok = pre.tokenizer
    (b,) = batches(prepare_proteins(read_proteins(FASTA, n), tok, length, rate, 0, masked_lm=True), tok, 10_000,
                   None, masked_lm=True)
    return b


# --- inputs --------------------------------------------------------------------------------------------------
def test_masked_lm_input_is_cls_residues_eos_with_mask_and_aligned_labels():
    pre = _esm()
    tok = pre.tokenizer
    records = read_proteins(FASTA, 5)
    prots = prepare_proteins(records, tok, 60, 0.15, seed=3, masked_lm=True)
    again = prepare_proteins(records, tok, 60, 0.15, seed=3, masked_lm=True)
    other = prepare_proteins(records, tok, 60, 0.15, seed=4, masked_lm=True)
    assert all(np.array_equal(p.example.input_ids, q.example.input_ids) for p, q in zip(prots, again))  # seeded
    assert any(not np.array_equal(p.example.input_ids, q.example.input_ids) for p, q in zip(prots, other))
    for p, (_, seq) in zip(prots, records):
        ids, labels = p.example.input_ids, p.example.labels
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(labels) == len(ids) == p.length + 2
        masked = ids == tok.mask_id
        assert round(0.15 * p.length) - 1 <= masked.sum() <= round(0.15 * p.length) + 1
        clean = tok.encode(seq[p.start:p.start + p.length], unknown="x")
        assert list(np.where(masked, labels, ids)) == clean  # labels hold the true residue where masked
        assert (labels[~masked] == -100).all()
        assert not set(ids.tolist()) & set(tok.sentinel_ids) and not tok.prefix_ids  # no sentinels, no [NLU]
    (b,) = batches(prots, tok, 10_000, None, masked_lm=True)
    assert b.decoder_input_ids is None
    assert torch.equal(b.pred_mask, b.input_ids == tok.mask_id)
    special = torch.isin(b.input_ids, torch.tensor([tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id]))
    assert not b.enc_tokens[special].any()
    assert int(b.enc_tokens.sum() + b.pred_mask.sum()) == sum(p.length for p in prots)
    assert not (b.clean_input_ids() == tok.mask_id).any()


def test_masked_lm_input_needs_a_mask_token():
    tok = _esm().tokenizer
    tok.mask_id = None
    with pytest.raises(ConfigError, match="no <mask> token"):
        prepare_proteins(read_proteins(FASTA, 1), tok, 30, 0.15, 0, masked_lm=True)


# --- the runner is the model ---------------------------------------------------------------------------------
def test_block_by_block_run_equals_the_model():
    pre = _esm()
    model = pre.model
    b = _batch(pre)
    assert (b.attention_mask == 0).any()  # padding present: the mask must reach the embedding
    with torch.inference_mode():
        enc = StackRunner(model.encoder)
        h = enc.embed(b.input_ids, b.attention_mask)
        out = enc.normed(enc.run(h, enc.masks(h, b.attention_mask), 0)[-1])
        ref = model.encode(b.input_ids, b.attention_mask).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(model.mlm_logits(out), model(b.input_ids, b.attention_mask), rtol=0, atol=0)
        # without the mask, token dropout counts padding as tokens: the embedding of a padded row changes
        assert not torch.equal(enc.embed(b.input_ids), h)


# --- measures with known answers -----------------------------------------------------------------------------
def test_early_exit_at_the_last_layer_is_the_full_model():
    pre = _esm(seed=1)
    r = _run(pre)
    ee, n = r.encoder.early_exit, r.encoder.n_layers
    assert ee.layers == [0, 1, 2, 3]
    assert ee.kl.mean[-1] == 0.0 and ee.top1_agreement.mean[-1] == 1.0
    assert ee.kl.mean[0] > 1e-4 and ee.top1_agreement.mean[0] < 1.0  # the embedding is not the model
    assert ee.accuracy.mean[-1] == pytest.approx(r.full_model["masked_accuracy"], abs=1e-12)
    # the full model's accuracy, computed here from model(...) logits at the masked positions
    per_protein = np.full(6, np.nan)
    with torch.inference_mode():
        tok = pre.tokenizer
        prots = prepare_proteins(read_proteins(FASTA, 6), tok, 48, 0.15, 0, masked_lm=True)
        for b in batches(prots, tok, 4096, None, masked_lm=True):
            hit = (pre.model(b.input_ids, b.attention_mask).argmax(-1) == b.labels).float()
            per_protein[b.index] = row_mean(hit, b.pred_mask).numpy()
    assert r.full_model["masked_accuracy"] == pytest.approx(per_protein.mean(), abs=1e-12)
    assert r.full_model["n_predictions"] == r.inputs["predicted_residues"] > 0
    # removing block N and exiting after block N-1 feed the same stream to the head: an exact identity
    skip_kl = r.encoder.skip.output_kl.mean[r.encoder.skip.skipped.index(n)]
    assert skip_kl > 1e-5 and skip_kl == pytest.approx(ee.kl.mean[ee.layers.index(n - 1)], rel=1e-5)


def test_skipped_block_changes_later_streams_and_a_zeroed_one_does_not():
    pre = _esm(seed=2, num_hidden_layers=4)
    _zero_block(pre.model.encoder.block[1])  # block 2 adds nothing
    r = _run(pre)
    co, sk = r.encoder.contribution, r.encoder.skip
    assert co.layer_rel.mean[1] == 0.0 and all(v > 1e-3 for i, v in enumerate(co.layer_rel.mean) if i != 1)
    row = sk.skipped.index(2)
    assert all(v == 0.0 for v in sk.hidden_change[row][1:])
    assert sk.output_kl.mean[row] == 0.0 and sk.output_top1_agreement.mean[row] == 1.0
    for layer in (1, 3, 4):  # every other block changes every later stream, and the output
        i = sk.skipped.index(layer)
        assert all(v > 1e-3 for v in sk.hidden_change[i][layer - 1:])
        assert sk.output_kl.mean[i] > 1e-6


def test_results_do_not_depend_on_batching():
    """Each protein alone (no padding) and all in one padded batch give the same numbers."""
    pre = _esm(seed=3)
    one = _run(pre, batch_tokens=1).to_json_dict()
    many = _run(pre, batch_tokens=100_000).to_json_dict()
    for part in ("contribution", "skip", "early_exit", "similarity"):
        a, b = _numbers(one["encoder"][part]), _numbers(many["encoder"][part])
        assert len(a) > 10
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=part)
    np.testing.assert_allclose(_numbers(one["full_model"]), _numbers(many["full_model"]), rtol=1e-5)


def _numbers(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _numbers(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [float(x)]
    return [float("nan")] if x is None else []


def test_cka_reads_every_residue_of_the_clean_input():
    pre = _esm(seed=4)
    r = _run(pre, n=4, analyses=("cka",), cka_tokens=100_000)
    assert r.encoder.similarity.n_tokens == r.inputs["n_residues"]  # masked positions included, <cls>/<eos> not
    tok = pre.tokenizer
    prots = prepare_proteins(read_proteins(FASTA, 4), tok, 48, None, 0)  # the clean input, as protlm embed
    with torch.inference_mode():
        feats = []
        for b in batches(prots, tok, 100_000):
            hs = pre.model.encode(b.input_ids, b.attention_mask, output_layers=[0, 3])
            feats.append([hs.hidden_states[0][b.enc_tokens], hs.hidden_states[3][b.enc_tokens]])
        x0 = pre.model.encoder.final_layer_norm(torch.cat([f[0] for f in feats]))
        x3 = torch.cat([f[1] for f in feats])
    assert r.encoder.similarity.cka[0][3] == pytest.approx(linear_cka_matrix([x0, x3])[0, 1], rel=1e-4)


def test_probe_on_an_esm_model_with_real_ssp3_data():
    r = _run(_esm(), n=3, probe_task="ssp3", probe_data=PROBE_DATA, probe_train=30, probe_test=10,
             analyses=("probe",))
    pr = r.encoder.probe
    assert pr.layers == [0, 1, 2, 3] and pr.best_score > pr.majority_baseline and pr.n_test_residues > 300


# --- truncation ----------------------------------------------------------------------------------------------
def test_truncated_esm_encoder_outputs_the_normed_stream_and_round_trips(tmp_path):
    pre = _esm(seed=5)
    cut = truncate_encoder(pre.model, 2)
    assert cut.encoder.n_layers == 2 and cut.encoder_only and cut.kind == "masked-lm"
    b = _batch(pre, rate=None)
    with torch.inference_mode():
        enc = StackRunner(pre.model.encoder)
        h = enc.embed(b.input_ids, b.attention_mask)
        want = enc.normed(enc.run(h, enc.masks(h, b.attention_mask), 0)[1])
        torch.testing.assert_close(cut.encode(b.input_ids, b.attention_mask).last_hidden_state, want, rtol=0, atol=0)
        protlm.save_pretrained(cut, tmp_path / "cut", pre.tokenizer)
        back = protlm.load(str(tmp_path / "cut"))
        assert back.model.encoder_only and back.model.encoder.n_layers == 2
        torch.testing.assert_close(back.model.encode(b.input_ids, b.attention_mask).last_hidden_state, want,
                                   rtol=0, atol=0)
    with pytest.raises(ConfigError, match="out of range for a 3-layer encoder"):
        truncate_encoder(pre.model, 4)


# --- what a masked LM does not have --------------------------------------------------------------------------
def test_decoder_requests_are_refused_in_one_line():
    pre = _esm()
    for opts in (dict(decoder=True), dict(decoder_layers=[1])):
        with pytest.raises(ConfigError, match="masked LM: it has no decoder"):
            _run(pre, **opts)
    short = _esm(max_position_embeddings=42)
    limit = short.model.max_residues
    assert limit < 48
    with pytest.raises(ConfigError, match=f"--max-length 48 is longer than the {limit} residues this model was"):
        _run(short, max_length=48)


def test_esm_without_its_lm_head_gets_the_encoder_analyses_on_clean_input():
    pre = _esm(encoder_only=True)
    r = _run(pre)
    assert r.full_model == {} and r.model["output"] is None and r.inputs["masked_lm_input"] is False
    assert r.encoder.early_exit is None and r.encoder.skip.output_kl is None
    assert r.inputs["encoder_tokens_averaged"] == r.inputs["n_residues"]  # nothing masked
    with pytest.raises(ConfigError, match="early-exit needs the LM head"):
        _run(pre, analyses=("early-exit",))


# --- command line --------------------------------------------------------------------------------------------
def test_cli_end_to_end_on_a_tiny_esm(tmp_path, capsys):
    from protlm.cli.main import main

    pre = _esm(seed=6)
    protlm.save_pretrained(pre.model, tmp_path / "model", pre.tokenizer)
    out = tmp_path / "out"
    code = main(["analyze", "depth", str(tmp_path / "model"), FASTA, "-o", str(out), "--max-proteins", "4",
                 "--max-length", "40", "--probe-data", PROBE_DATA, "--probe-train", "12", "--probe-test", "4",
                 "--truncate-at", "2", "--quiet"])
    assert code == 0
    report = json.loads((out / "depth.json").read_text())
    assert set(report["options"]["analyses"]) == {"contribution", "skip", "early-exit", "cka", "probe"}
    assert report["model"]["kind"] == "masked-lm" and report["model"]["output"] == "lm-head"
    assert "LM head" in report["model"]["output_means"] and report["decoder"] is None
    assert report["full_model"]["n_predictions"] > 0 and report["encoder"]["early_exit"]["layers"] == [0, 1, 2, 3]
    md = (out / "depth.md").read_text()
    for text in (md, report["summary"], report["model"]["output_means"], report["encoder"]["tokens"]):
        assert "decoder" not in text.lower()
    assert "Logit lens (encoder layer l → final norm → LM head)" in md and "LM head" in report["summary"]
    for name in ("contribution", "skip", "early_exit", "probe", "cka"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cut = protlm.load(report["truncated"]["path"])
    assert cut.model.encoder.n_layers == 2 and cut.model.encoder_only
    assert "decoder" not in capsys.readouterr().out.lower()
