"""Depth analysis on constructed models whose answers are known, plus the bad-input errors of the issue."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import protlm
from protlm.analysis import DepthOptions, analyze_depth, truncate_encoder
from protlm.analysis.inputs import batches, denoise_example, prepare_proteins, read_proteins
from protlm.analysis import metrics
from protlm.analysis.metrics import OutputReference, linear_cka_matrix, row_mean
from protlm.analysis.probe import LayerProbes, _Moments, _ridge_solutions, _sse, load_probe_task
from protlm.analysis.blocks import StackRunner
from protlm.analysis.summary import _dispensable_tail
from protlm.errors import ConfigError
from protlm.tokenizer.vocab import protlm_tokenizer

from .conftest import DATA, odd_config

FASTA = os.path.join(DATA, "ecoli_k12_excerpt.fasta")
PROBE_DATA = os.path.join(DATA, "ssp3_flip_excerpt")
FAST = dict(max_length=48, probe_task=None)  # short windows keep every test well under a second of model time


def _model(seed=0, **cfg):
    return protlm.random_init(odd_config(**cfg), seed=seed)


def _zero_block(block):
    """Zero the output projections of every sublayer of a block: it then adds nothing to the residual stream."""
    with torch.no_grad():
        for sub in block.layer:
            inner = getattr(sub, "SelfAttention", None) or getattr(sub, "EncDecAttention", None)
            if inner is not None:
                inner.o.weight.zero_()
            else:
                sub.DenseReluDense.wo.weight.zero_()


def _run(pre, n=6, **opts):
    return analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts}), max_proteins=n)


# --- inputs --------------------------------------------------------------------------------------------------
def test_denoise_example_layout():
    tok = protlm_tokenizer()
    residues = tok.residue_array("MKTAYIAKQRQISFVKSHFSRQ")
    ex = denoise_example(residues, np.random.default_rng(0), 0.3, tok)
    k = (len(ex.labels) - 1) // 2
    assert k in (math.floor(0.3 * len(residues)), math.ceil(0.3 * len(residues)))
    assert ex.input_ids[0] == tok.prefix_ids["nlu"] and ex.input_ids[-1] == tok.eos_id
    body = ex.input_ids[1:-1]
    masked = np.flatnonzero(body != residues)
    assert list(body[masked]) == tok.sentinel_ids[:k]  # i-th masked position gets sentinel i
    assert list(ex.labels[0:-1:2]) == tok.sentinel_ids[:k]
    assert list(ex.labels[1:-1:2]) == list(residues[masked]) and ex.labels[-1] == tok.eos_id


def test_denoise_example_without_a_task_prefix():
    """Ankh and ProtT5 vocabularies have no [NLU]: the same example, without the prefix."""
    tok = protlm_tokenizer()
    residues = tok.residue_array("MKTAYIAKQRQISFVKSHFSRQ")
    with_prefix = denoise_example(residues, np.random.default_rng(3), 0.2, tok)
    tok.prefix_ids = {}
    plain = denoise_example(residues, np.random.default_rng(3), 0.2, tok)
    assert list(plain.input_ids) == list(with_prefix.input_ids[1:])
    assert list(plain.labels) == list(with_prefix.labels)


def test_token_masks_exclude_specials_and_padding():
    tok = protlm_tokenizer()
    prots = prepare_proteins(read_proteins(FASTA, 5), tok, 30, 0.2, seed=1)
    (b,) = batches(prots, tok, 10_000)
    ids = b.input_ids
    assert not b.enc_tokens[ids == tok.pad_id].any() and not b.enc_tokens[ids == tok.eos_id].any()
    assert not b.enc_tokens[:, 0].any()  # [NLU]
    assert not b.enc_tokens[torch.isin(ids, torch.tensor(tok.sentinel_ids))].any()
    assert int(b.enc_tokens.sum()) == sum(p.length for p in prots) - int(b.pred_mask.sum())
    # the decoder positions averaged over are exactly those whose label is a masked residue
    assert torch.equal(b.pred_mask, torch.isin(b.labels, torch.as_tensor(tok.residue_id_array)))


def test_row_mean_ignores_masked_positions_and_flags_empty_rows():
    v = torch.tensor([[1.0, 2.0, 100.0], [5.0, 5.0, 5.0]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    out = row_mean(v, m)
    assert out[0] == 1.5 and math.isnan(out[1])


# --- the runner is the model ---------------------------------------------------------------------------------
def test_block_by_block_run_equals_the_model():
    pre = _model()
    model, tok = pre.model, pre.tokenizer
    (b,) = batches(prepare_proteins(read_proteins(FASTA, 4), tok, 40, 0.15, 0), tok, 10_000)
    with torch.inference_mode():
        enc, dec = StackRunner(model.encoder), StackRunner(model.decoder)
        h = enc.embed(b.input_ids)
        em = enc.masks(h, b.attention_mask)
        enc_out = enc.normed(enc.run(h, em, 0)[-1])
        d = dec.embed(b.decoder_input_ids)
        logits = model.lm_logits(dec.normed(dec.run(d, dec.masks(d, None, b.attention_mask), 0, enc=enc_out)[-1]))
        ref = model(b.input_ids, b.attention_mask, decoder_input_ids=b.decoder_input_ids)
    torch.testing.assert_close(enc_out, ref.encoder.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)


# --- constructed models with known answers -------------------------------------------------------------------
def test_zeroed_layer_has_zero_contribution_and_zero_skip_effect():
    pre = _model(num_layers=4, num_decoder_layers=3)
    _zero_block(pre.model.encoder.block[1])  # encoder block 2
    _zero_block(pre.model.decoder.block[1])  # decoder block 2 (self, cross and FFN)
    r = _run(pre)
    for rep in (r.encoder, r.decoder):
        co, sk = rep.contribution, rep.skip
        for series in (co.attn_rel, co.ffn_rel, co.layer_rel) + ((co.cross_rel,) if co.cross_rel else ()):
            assert series.mean[1] == 0.0
            assert all(v > 1e-3 for i, v in enumerate(series.mean) if i != 1)  # the others do contribute
        row = sk.skipped.index(2)
        assert all(v == 0.0 for v in sk.hidden_change[row][1:])  # streams 2..N unchanged
        assert all(v > 1e-3 for v in sk.hidden_change[sk.skipped.index(1)])
        assert sk.output_kl.mean[row] == 0.0 and sk.output_top1_agreement.mean[row] == 1.0
        assert sk.output_kl.mean[sk.skipped.index(1)] > 1e-5
    # the summary names the zeroed layer's neighbours correctly: layer 2 is not the most important one
    assert "layer whose removal matters most is 2 " not in r.summary


def test_summary_names_the_layers_that_do_nothing():
    pre = _model(num_layers=5, initializer_factor=1.0)  # at init 0.5 the decoder barely reads the encoder
    for blk in pre.model.encoder.block[3:]:  # blocks 4 and 5 add nothing
        _zero_block(blk)
    r = _run(pre, analyses=("skip", "early-exit"))
    assert "Removing any single one of encoder layers 4…5 changes the output by at most 0.0%" in r.summary
    assert "Exiting the encoder after layer 3 of 5 (and any later one) already agrees" in r.summary
    assert _dispensable_tail([1, 2, 3, 4], [0.5, 0.01, 0.2, 0.01], 4, 0.05) == 4
    assert _dispensable_tail([1, 2, 3, 4], [0.5, 0.01, 0.2, 0.3], 4, 0.05) is None
    assert _dispensable_tail([2, 4], [0.01, 0.01], 4, 0.05) == 4  # a gap in the analysed layers ends the run


def test_identity_like_model_has_cka_one_and_free_early_exit():
    pre = _model(num_layers=4)
    for blk in pre.model.encoder.block:
        _zero_block(blk)
    r = _run(pre)
    cka = np.array(r.encoder.similarity.cka)
    np.testing.assert_allclose(cka, 1.0, atol=1e-5)
    assert all(kl < 1e-6 for kl in r.encoder.early_exit.kl.mean)
    assert all(a == 1.0 for a in r.encoder.early_exit.top1_agreement.mean)
    assert all(v == 0.0 for v in r.encoder.contribution.layer_rel.mean)
    # the decoder is untouched: its layers are not identical
    assert np.array(r.decoder.similarity.cka).min() < 1 - 1e-4


def test_skipping_the_last_layer_equals_exiting_one_layer_early():
    """Removing block N and exiting after block N-1 feed the same stream to the head: an exact identity."""
    r = _run(_model(seed=3))
    for rep in (r.encoder, r.decoder):
        n = rep.n_layers
        skip_kl = rep.skip.output_kl.mean[rep.skip.skipped.index(n)]
        exit_kl = rep.early_exit.kl.mean[rep.early_exit.layers.index(n - 1)]
        assert skip_kl > 1e-5
        assert skip_kl == pytest.approx(exit_kl, rel=1e-5)
        # and exiting at the last layer is the full model
        assert rep.early_exit.kl.mean[-1] == 0.0


def test_skip_matrix_first_entry_is_the_removed_update():
    """After removing block l, stream l equals stream l-1: the change is ||h_l - h_(l-1)|| / ||h_l||."""
    pre = _model(seed=5)
    r = _run(pre, n=3, analyses=("skip",))
    tok = pre.tokenizer
    prots = prepare_proteins(read_proteins(FASTA, 3), tok, 48, 0.15, 0)
    expected = np.zeros(3)
    with torch.inference_mode():
        for b in batches(prots, tok, 10_000):
            enc = StackRunner(pre.model.encoder)
            h = enc.embed(b.input_ids)
            hs = [h] + enc.run(h, enc.masks(h, b.attention_mask), 0)
            change = (hs[2] - hs[1]).norm(dim=-1) / hs[2].norm(dim=-1)
            expected[b.index] = row_mean(change, b.enc_tokens).numpy()
    assert r.encoder.skip.hidden_change[1][1] == pytest.approx(expected.mean(), rel=1e-5)
    assert math.isnan(r.encoder.skip.hidden_change[1][0])  # stream 1 precedes block 2


def test_results_do_not_depend_on_batching():
    pre = _model(seed=1)
    one = _run(pre, batch_tokens=1).to_json_dict()  # every protein alone: no padding at all
    many = _run(pre, batch_tokens=100_000).to_json_dict()
    for stack in ("encoder", "decoder"):
        for part in ("contribution", "skip", "early_exit"):
            a, b = _numbers(one[stack][part]), _numbers(many[stack][part])
            assert len(a) > 10
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{stack}.{part}")


def _numbers(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _numbers(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [float(x)]
    if x is None:
        return [float("nan")]
    return []


@pytest.mark.parametrize("skip_proteins, stop_at", [(None, 3), (4, 3), (4, 4)])
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch, skip_proteins, stop_at):
    """Ctrl-C in a main batch or in a batch of the skip sample (which run after the main ones)."""
    from protlm.analysis import depth

    pre = _model(seed=6)
    opts = dict(batch_tokens=120, skip_proteins=skip_proteins)  # several batches
    want = _run(pre, **opts).to_json_dict()
    state = str(tmp_path / "state.pt")
    monkeypatch.setattr(depth._Checkpoint, "EVERY_SECONDS", 0.0)
    real, calls = {m: getattr(depth._Analyser, m) for m in ("batch", "skip_batch")}, []

    def flaky(method):
        def run(self, b, **kw):
            calls.append(method)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real[method](self, b, **kw)
        return run

    for m in real:
        monkeypatch.setattr(depth._Analyser, m, flaky(m))
    with pytest.raises(KeyboardInterrupt):
        analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts}), max_proteins=6, state_path=state)
    assert calls[-1] == ("batch" if stop_at == 3 else "skip_batch")
    for m, f in real.items():
        monkeypatch.setattr(depth._Analyser, m, f)
    got = analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts}), max_proteins=6, state_path=state).to_json_dict()
    assert got["timing"]["resumed_after_batches"] == stop_at - 1
    for part in ("encoder", "decoder", "full_model"):
        np.testing.assert_allclose(_numbers(got[part]), _numbers(want[part]), rtol=1e-6, atol=1e-7)
    if skip_proteins is not None:
        return
    # a different run (other options) does not pick up the saved state
    other = analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts, "mask_rate": 0.3}), max_proteins=6,
                          state_path=state)
    assert other.timing["resumed_after_batches"] == 0


@pytest.mark.parametrize("chunk", [7 * 50, 1 << 23])  # 7 rows at a time, or all rows at once
def test_output_reference_compares_as_the_log_probabilities_say(monkeypatch, chunk):
    """KL, top-1 agreement and accuracy from the stored reference equal those computed from full log-softmaxes,
    whether the rows go through in chunks or at once, and for bf16 logits."""
    monkeypatch.setattr(metrics, "CHUNK_LOGITS", chunk)
    g = torch.Generator().manual_seed(0)
    n, vocab = 30, 50
    full, other = torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3
    other[:10] = full[:10] + 0.01 * other[:10]  # some positions keep their top-1
    labels = torch.randint(0, vocab, (n,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        f, o = full.to(dtype), other.to(dtype)
        ref = OutputReference(lambda rows: f[rows], n, vocab, labels)
        cmp = ref.compare(lambda rows: o[rows], n)
        lp, lq = torch.log_softmax(f.float(), -1), torch.log_softmax(o.float(), -1)
        torch.testing.assert_close(cmp.kl, (lp.exp() * (lp - lq)).sum(-1), rtol=1e-5, atol=1e-6)
        assert torch.equal(cmp.top1_agree, (lq.argmax(-1) == lp.argmax(-1)).float())
        assert torch.equal(cmp.correct, (lq.argmax(-1) == labels).float())
        assert 0 < cmp.top1_agree.sum() < n
        torch.testing.assert_close(ref.nll, -lp.gather(-1, labels[:, None])[:, 0])
        same = ref.compare(lambda rows: f[rows], n)
        torch.testing.assert_close(same.kl, torch.zeros(n), atol=1e-5, rtol=0)
        assert torch.equal(ref.itself().correct, same.correct) and bool(same.top1_agree.all())


def test_skip_analysis_on_a_sample_averages_those_proteins(monkeypatch):
    """--skip-proteins K: the skip means are those of the sampled proteins (here the first three, as a run on
    those three alone gives them); every other analysis still covers all six."""
    from protlm.analysis import depth

    pre = _model(seed=2)
    monkeypatch.setattr(depth, "skip_sample", lambda n, plan, options: np.arange(3))
    sampled = _run(pre, n=6, skip_proteins=3, batch_tokens=120)
    monkeypatch.undo()
    alone, full = _run(pre, n=3, skip_proteins=None), _run(pre, n=6, skip_proteins=None)
    for stack in ("encoder", "decoder"):
        a, b = getattr(sampled, stack).skip, getattr(alone, stack).skip
        assert a.n_proteins == 3 and getattr(full, stack).skip.n_proteins == 6
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        for field in ("hidden_change", "output_kl", "output_top1_agreement"):
            assert len(_numbers(a[field])) > 2
            np.testing.assert_allclose(_numbers(a[field]), _numbers(b[field]), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{stack}.{field}")
        np.testing.assert_allclose(_numbers(dataclasses.asdict(getattr(sampled, stack).early_exit)),
                                   _numbers(dataclasses.asdict(getattr(full, stack).early_exit)), rtol=1e-4, atol=1e-5)
    assert sampled.inputs["skip_proteins"] == 3 and full.inputs["skip_proteins"] == 6
    # the sample itself: seeded, sorted, distinct; none when it would hold every protein
    plan = depth.resolve_plan(pre.model, DepthOptions(**FAST))
    draw = depth.skip_sample(200, plan, DepthOptions(skip_proteins=64, seed=1))
    assert len(set(draw.tolist())) == 64 and list(draw) == sorted(draw) and draw.max() < 200
    assert np.array_equal(draw, depth.skip_sample(200, plan, DepthOptions(skip_proteins=64, seed=1)))
    assert not np.array_equal(draw, depth.skip_sample(200, plan, DepthOptions(skip_proteins=64, seed=2)))
    assert depth.skip_sample(64, plan, DepthOptions(skip_proteins=64)) is None
    with pytest.raises(ConfigError, match="--skip-proteins"):
        depth.resolve_plan(pre.model, DepthOptions(**FAST, skip_proteins=0))


def test_encoder_only_model_gets_the_encoder_analyses():
    pre = protlm.random_init(odd_config(), seed=0, encoder_only=True)
    r = _run(pre)
    assert r.decoder is None and r.full_model == {}
    assert r.encoder.early_exit is None and r.encoder.skip.output_kl is None
    assert r.encoder.contribution.layer_rel.mean[0] > 0 and len(r.encoder.similarity.layers) == 4
    assert r.inputs["denoising_input"] is False


# --- CKA and probes ------------------------------------------------------------------------------------------
def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rotated = 3.0 * x @ q + 7.0  # rotation, isotropic scale and offset leave linear CKA at 1
    unrelated = torch.randn(500, 16, generator=g)
    half = torch.cat([x[:, :8], unrelated[:, 8:]], dim=1)
    m = linear_cka_matrix([x, rotated, unrelated, half])
    assert m[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert m[0, 2] < 0.1  # independent noise: only the finite-sample bias remains
    assert 0.3 < m[0, 3] < 0.7
    np.testing.assert_allclose(m, m.T)
    # against the token-space definition <X X^T, Y Y^T> / (||X X^T|| ||Y Y^T||)
    xc, hc = x - x.mean(0), half - half.mean(0)
    kx, kh = xc @ xc.T, hc @ hc.T
    assert m[0, 3] == pytest.approx(float((kx * kh).sum() / (kx.norm() * kh.norm())), rel=1e-4)


def test_ridge_moments_give_the_direct_solution_and_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g) + 4.0
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (300,), generator=g), 3).float()
    m = _Moments(6, 3, "cpu")
    m.add(x[:150], y[:150])
    m.add(x[150:], y[150:])
    (w, b), = _ridge_solutions(m, [0.0])
    design = torch.cat([x.double(), torch.ones(300, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, y.double()).solution
    # fp32 batch products (as in the probe) with an offset of 4: agreement to ~1e-6, not to fp64 precision
    torch.testing.assert_close(w, ref[:6], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(b, ref[6], atol=1e-5, rtol=1e-3)
    direct = float(((x.double() @ w + b - y.double()) ** 2).sum())
    assert _sse(m, w, b) == pytest.approx(direct, rel=1e-6)


def test_layer_probes_read_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(2)
    n = 3000
    feats = torch.randn(n, 10, generator=g)
    y = (feats[:, :3] @ torch.randn(3, 3, generator=g)).argmax(-1)  # layer 1 carries the label linearly
    noise = torch.randn(n, 10, generator=g)  # layer 0 carries nothing
    protein = torch.arange(n) // 30
    probes = LayerProbes([0, 1], 3)
    probes.add_train({0: noise[:2000], 1: feats[:2000]}, y[:2000], protein[:2000])
    probes.fit()
    probes.add_test({0: noise[2000:], 1: feats[2000:]}, y[2000:])
    noise_acc, signal_acc = probes.scores()
    assert signal_acc > 0.85
    assert noise_acc < probes.majority_baseline() + 0.05


def test_probe_on_a_model_with_real_ssp3_data():
    pre = _model(seed=0)
    r = _run(pre, n=3, probe_task="ssp3", probe_data=PROBE_DATA, probe_train=40, probe_test=12,
             analyses=("probe",))
    pr = r.encoder.probe
    assert pr.layers == [0, 1, 2, 3] and pr.n_train_proteins == 40 and pr.n_test_proteins == 12
    assert all(0.0 <= s <= 1.0 for s in pr.score)
    assert pr.best_score == max(pr.score) and pr.layer_95 <= pr.best_layer
    assert pr.score[pr.layers.index(pr.layer_95)] >= 0.95 * pr.best_score
    # residue identity alone is informative for secondary structure: better than the majority class
    assert pr.best_score > pr.majority_baseline
    assert pr.n_test_residues > 500


# --- truncation ----------------------------------------------------------------------------------------------
def test_truncated_encoder_outputs_the_normed_stream_and_round_trips(tmp_path):
    pre = _model(seed=2)
    cut = truncate_encoder(pre.model, 2)
    assert cut.encoder.n_layers == 2 and cut.decoder is None
    tok = pre.tokenizer
    (b,) = batches(prepare_proteins(read_proteins(FASTA, 3), tok, 40, None, 0), tok, 10_000)
    with torch.inference_mode():
        enc = StackRunner(pre.model.encoder)
        h = enc.embed(b.input_ids)
        want = enc.normed(enc.run(h, enc.masks(h, b.attention_mask), 0)[1])
        got = cut.encode(b.input_ids, b.attention_mask).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        protlm.save_pretrained(cut, tmp_path / "cut", tok)
        back = protlm.load(str(tmp_path / "cut"))
        assert back.model.encoder_only and back.model.encoder.n_layers == 2
        torch.testing.assert_close(back.model.encode(b.input_ids, b.attention_mask).last_hidden_state, want,
                                   rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------------------------
def test_layer_index_out_of_range_is_a_config_error():
    pre = _model()
    with pytest.raises(ConfigError, match="layer 9 is out of range for a 3-layer encoder"):
        _run(pre, encoder_layers=[1, 9])
    with pytest.raises(ConfigError, match="out of range for a 2-layer decoder"):
        _run(pre, decoder_layers=[5])
    with pytest.raises(ConfigError, match="out of range for a 3-layer encoder"):
        truncate_encoder(pre.model, 4)


def test_missing_probe_data_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PROTLM_DATA", raising=False)
    with pytest.raises(ConfigError, match="needs its data: pass --probe-data"):
        load_probe_task("ssp3", None, 10, 5)
    with pytest.raises(ConfigError, match="does not hold flip_ss3_sequences"):
        _run(_model(), probe_task="ssp3", probe_data=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown probe task 'ssp9'"):
        load_probe_task("ssp9", PROBE_DATA, 10, 5)


def test_decoder_analyses_on_an_encoder_only_model_are_errors():
    pre = protlm.random_init(odd_config(), seed=0, encoder_only=True)
    with pytest.raises(ConfigError, match="encoder-only"):
        _run(pre, decoder=True)
    with pytest.raises(ConfigError, match="early-exit needs a decoder"):
        _run(pre, analyses=("early-exit",))
    with pytest.raises(ConfigError, match="encoder-only"):
        _run(pre, decoder_layers=[1])


# --- command line --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_json_plots_summary_and_truncated_model(tmp_path):
    from protlm.cli.main import main

    pre = _model(seed=4)
    protlm.save_pretrained(pre.model, tmp_path / "model", pre.tokenizer)
    out = tmp_path / "out"
    code = main(["analyze", "depth", str(tmp_path / "model"), FASTA, "-o", str(out), "--max-proteins", "5",
                 "--max-length", "48", "--probe-data", PROBE_DATA, "--probe-train", "20", "--probe-test", "6",
                 "--truncate-at", "auto", "--quiet"])
    assert code == 0
    report = json.loads((out / "depth.json").read_text())
    assert set(report["options"]["analyses"]) == {"contribution", "skip", "early-exit", "cka", "probe"}
    assert report["encoder"]["probe"]["task"] == "ssp3" and report["decoder"]["early_exit"]["layers"] == [0, 1, 2]
    assert len(report["encoder"]["skip"]["hidden_change"]) == 3 and report["inputs"]["n_proteins"] == 5
    for name in ("contribution", "skip", "early_exit", "probe", "cka"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "depth.md").read_text()
    assert "## Summary" in md and report["summary"] in md and "randomly initialised" not in md
    k = max(1, report["encoder"]["probe"]["layer_95"])
    assert report["truncated"]["layer"] == k
    cut = protlm.load(report["truncated"]["path"])
    assert cut.model.encoder.n_layers == k and cut.model.encoder_only


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from protlm.cli.main import main

    monkeypatch.delenv("PROTLM_DATA", raising=False)
    base = ["analyze", "depth", "debug", FASTA, "--random-init", "-o", str(tmp_path / "o"), "--task", "none",
            "--max-proteins", "2", "--quiet"]
    for extra, message in ((["--truncate-at", "3"], "--truncate-at 3 is out of range for a 2-layer encoder"),
                           (["--task", "ssp3"], "needs its data: pass --probe-data"),
                           (["--task", "ssp3", "--probe-data", str(tmp_path)], "does not hold flip_ss3"),
                           (["--decoder-layers", "-3"], "layer -3 is out of range for a 1-layer decoder"),
                           (["--skip-proteins", "0"], "--skip-proteins must be at least 1")):
        assert main(base + extra) == 2
        err = _without_precision_line(capsys.readouterr().err)
        assert err.strip().count("\n") == 0 and message in err, err
    # a malformed count fails before the model is loaded
    assert main(base + ["--skip-proteins", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--skip-proteins takes a number of proteins or 'all', got 'abc'" in err
    assert not (tmp_path / "o").exists()  # nothing written for a bad request
    # and as a process: one line on stderr, no traceback
    proc = subprocess.run([sys.executable, "-m", "protlm.cli.main"] + base + ["--layers", "7"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = _without_precision_line(proc.stderr)
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "layer 7 is out of range for a 2-layer encoder" in err


def _without_precision_line(err: str) -> str:
    """stderr less the line that says which precision the run chose (it comes before any error about the input)."""
    lines = err.splitlines(keepends=True)
    assert lines and lines[0].startswith("protlm: precision auto -> fp32 ("), err
    return "".join(lines[1:])
