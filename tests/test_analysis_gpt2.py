"""Depth analysis of a causal LM (GPT-2 architecture, ProtGPT2's) on tiny odd-shaped random models: the checks of
``test_analysis_esm.py`` that matter, through the model protocol, plus what is new for a causal LM (clean input in
ProtGPT2's text convention, next-token output through ``ln_f`` and the tied head, BPE tokens spanning residues)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import protlm
from protlm.analysis import DepthOptions, analyze_depth
from protlm.analysis.blocks import StackRunner
from protlm.analysis.inputs import batches, prepare_proteins, read_proteins
from protlm.analysis.metrics import row_mean
from protlm.config import GPT2Config
from protlm.errors import ConfigError
from protlm.objectives.example import IGNORE_INDEX
from protlm.tokenizer.bpe import BPETokenizer

from .conftest import DATA
from .test_gpt2 import scramble, train_bpe

FASTA = os.path.join(DATA, "ecoli_k12_excerpt.fasta")
PROBE_DATA = os.path.join(DATA, "ssp3_flip_excerpt")
FAST = dict(max_length=48, probe_task=None)


def _gpt2(seed=0, encoder_only=False, bpe=True, **kw):
    """A random GPT-2 (3 blocks, 36 wide, 3 heads, FFN 50); ``bpe``: with a trained byte-level BPE whose tokens
    span several residues (else protlm's one-token-per-residue vocabulary)."""
    cfg = GPT2Config(**{**dict(vocab_size=120, n_positions=97, n_embd=36, n_layer=3, n_head=3, n_inner=50), **kw})
    pre = protlm.convert.load(cfg, random_init=True, seed=seed, encoder_only=encoder_only)
    # GPT-2's init (std 0.02) makes blocks that barely move the stream and a near-uniform head; wider weights make
    # every measure (and top-1) meaningful
    scramble(pre.model, seed + 1)
    if bpe:
        pre = dataclasses.replace(pre, tokenizer=BPETokenizer(train_bpe(120), "trained protein BPE"))
    return pre


def _zero_block(block):
    """Zero both output projections: the block then adds nothing to the residual stream."""
    with torch.no_grad():
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()


def _run(pre, n=6, **opts):
    return analyze_depth(pre, FASTA, DepthOptions(**{**FAST, **opts}), max_proteins=n)


def _batch(pre, n=4, length=48):
    tok = pre.tokenizer
    prots = prepare_proteins(read_proteins(FASTA, n), tok, length, 0.15, 0, causal_lm=True)
    (b,) = batches(prots, tok, 10_000, None, causal_lm=True)
    return prots, b


# --- inputs --------------------------------------------------------------------------------------------------
def test_causal_input_is_the_clean_text_with_labels_shifted_and_a_residue_map():
    pre = _gpt2()
    tok = pre.tokenizer
    prots, b = _batch(pre)
    for r, i in enumerate(b.index):
        p = prots[i]
        ids = p.example.input_ids
        assert len(np.unique(p.token_of_residue)) < p.length  # some tokens hold several residues
        assert ids[0] == ids[-1] == tok.eot_id  # <|endoftext|> opens and closes the protein
        np.testing.assert_array_equal(p.example.labels[:-1], ids[1:])
        assert p.example.labels[-1] == IGNORE_INDEX
        # the residue -> token map is what the tokenizer gives; residue-holding tokens are what hidden averages use
        np.testing.assert_array_equal(p.token_of_residue, tok.encode_residues(
            tok.residue_array(read_proteins(FASTA, 4)[i][1])[p.start:p.start + p.length])[1])
        want = np.zeros(b.input_ids.shape[1], dtype=bool)
        want[p.token_of_residue] = True
        np.testing.assert_array_equal(b.enc_tokens[r].numpy(), want)
        assert not b.enc_tokens[r, 0] and int(b.pred_mask[r].sum()) == len(ids) - 1  # no mask: every next token
    assert b.decoder_input_ids is None and (b.attention_mask == 0).any()


# --- the block runner ----------------------------------------------------------------------------------------
def test_block_by_block_run_equals_the_model():
    pre = _gpt2()
    model = pre.model
    _, b = _batch(pre)
    with torch.inference_mode():
        enc = StackRunner(model.encoder)
        h = enc.embed(b.input_ids, b.attention_mask)
        streams = [h] + enc.run(h, enc.masks(h, b.attention_mask), 0)
        ref = model.encode(b.input_ids, b.attention_mask, output_layers="all")
        real = b.attention_mask.bool()
        for l in range(model.encoder.n_layers):
            torch.testing.assert_close(streams[l][real], ref.hidden_states[l][real], rtol=0, atol=0)
        out = enc.normed(streams[-1])
        torch.testing.assert_close(out[real], ref.last_hidden_state[real], rtol=0, atol=0)
        torch.testing.assert_close(model.lm_logits(out)[real], model(b.input_ids, b.attention_mask)[real], rtol=0,
                                   atol=0)


# --- measures with known answers -----------------------------------------------------------------------------
def test_logit_lens_at_the_last_layer_is_the_full_model():
    pre = _gpt2(seed=1)
    r = _run(pre)
    ee, n = r.encoder.early_exit, r.encoder.n_layers
    assert r.model["output"] == "next-token" and ee.layers == [0, 1, 2, 3]
    assert ee.kl.mean[-1] == 0.0 and ee.top1_agreement.mean[-1] == 1.0
    assert ee.kl.mean[0] > 1e-4 and ee.top1_agreement.mean[0] < 1.0  # the embedding is not the model
    assert ee.accuracy.mean[-1] == pytest.approx(r.full_model["next_token_accuracy"], abs=1e-12)
    # the full model's next-token accuracy and NLL, computed here from model(...) logits
    acc, nll = np.full(6, np.nan), np.full(6, np.nan)
    with torch.inference_mode():
        tok = pre.tokenizer
        prots = prepare_proteins(read_proteins(FASTA, 6), tok, 48, None, 0, causal_lm=True)
        for b in batches(prots, tok, 4096, None, causal_lm=True):
            logp = torch.log_softmax(pre.model(b.input_ids, b.attention_mask), -1)
            acc[b.index] = row_mean((logp.argmax(-1) == b.labels).float(), b.pred_mask).numpy()
            tok_nll = -logp.gather(-1, b.labels.clamp(min=0)[..., None])[..., 0]
            nll[b.index] = row_mean(tok_nll, b.pred_mask).numpy()
    assert r.full_model["next_token_accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
    assert r.full_model["next_token_nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert r.full_model["n_predictions"] == r.inputs["predicted_residues"] > 0
    # removing block N and exiting after block N-1 feed the same stream to the head: an exact identity
    skip_kl = r.encoder.skip.output_kl.mean[r.encoder.skip.skipped.index(n)]
    assert skip_kl > 1e-5 and skip_kl == pytest.approx(ee.kl.mean[ee.layers.index(n - 1)], rel=1e-5)


def test_skipped_block_changes_later_streams_and_a_zeroed_one_does_not():
    pre = _gpt2(seed=2, n_layer=4)
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
    pre = _gpt2(seed=3)
    one = _run(pre, batch_tokens=1).to_json_dict()
    many = _run(pre, batch_tokens=100_000).to_json_dict()
    for part in ("contribution", "skip", "early_exit", "similarity"):
        a, b = (np.asarray(_numbers(x["encoder"][part])) for x in (one, many))
        assert len(a) > 10
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=part)


def _numbers(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _numbers(x[k])]
    if isinstance(x, list):
        return [v for e in x for v in _numbers(e)]
    return [x] if isinstance(x, float) else []


def test_probe_reads_residues_through_their_tokens():
    """Probes are over residues (each given the vector of its token), CKA over residue-holding tokens."""
    pre = _gpt2(seed=4)
    r = _run(pre, n=3, probe_task="ssp3", probe_data=PROBE_DATA, probe_train=12, probe_test=4,
             analyses=("probe", "cka"), max_length=80)
    from protlm.analysis.probe import load_probe_task

    task = load_probe_task("ssp3", PROBE_DATA, 12, 4, 0)
    windows = prepare_proteins(list(zip(task.test.ids, task.test.sequences)), pre.tokenizer, 80, None, 0,
                               causal_lm=True)  # the cropped windows the probe reads
    labelled = sum(int((y[w.start:w.start + w.length] >= 0).sum()) for y, w in zip(task.test.labels, windows))
    pr = r.encoder.probe
    assert pr.layers == [0, 1, 2, 3] and pr.n_test_residues == labelled
    assert r.encoder.similarity.n_tokens <= r.inputs["encoder_tokens_averaged"] < r.inputs["n_residues"]


# --- refusals ------------------------------------------------------------------------------------------------
def test_decoder_and_impossible_requests_are_refused_in_one_line():
    pre = _gpt2(bpe=False)
    for opts in (dict(decoder=True), dict(decoder_layers=[1])):
        with pytest.raises(ConfigError, match="causal LM: its one causal stack is analysed as the encoder") as e:
            _run(pre, **opts)
        assert "\n" not in str(e.value)
    limit = pre.model.max_residues
    with pytest.raises(ConfigError, match=f"--max-length 500 is longer than the {limit} residues"):
        _run(pre, max_length=500)
    bare = _gpt2(encoder_only=True, bpe=False)
    r = _run(bare)
    assert r.full_model == {} and r.model["output"] is None and r.encoder.early_exit is None
    with pytest.raises(ConfigError, match="early-exit needs the LM head"):
        _run(bare, analyses=("early-exit",))


# --- command line and the cross-objective comparison -----------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_and_compared_with_an_esm_run(tmp_path, capsys):
    from protlm.cli.main import main
    from protlm.config import EsmConfig

    common = ["--max-proteins", "4", "--max-length", "40", "--probe-data", PROBE_DATA, "--probe-train", "10",
              "--probe-test", "4", "--cka-tokens", "256", "--quiet", "--dtype", "fp32"]
    pre = _gpt2(seed=6)
    protlm.save_pretrained(pre.model, tmp_path / "gpt2", pre.tokenizer)
    esm = protlm.convert.load(EsmConfig(hidden_size=36, num_hidden_layers=4, num_attention_heads=3,
                                        intermediate_size=37), random_init=True, seed=2)
    protlm.save_pretrained(esm.model, tmp_path / "esm", esm.tokenizer)
    runs = {name: tmp_path / "runs" / name for name in ("gpt2", "esm")}
    for name, run_dir in runs.items():
        cut = ["--truncate-at", "2"] if name == "gpt2" else []
        assert main(["analyze", "depth", str(tmp_path / name), FASTA, "-o", str(run_dir), *common, *cut]) == 0
    report = json.loads((runs["gpt2"] / "depth.json").read_text())
    assert set(report["options"]["analyses"]) == {"contribution", "skip", "early-exit", "cka", "probe"}
    assert report["model"]["kind"] == "causal-lm" and report["model"]["output"] == "next-token"
    assert report["inputs"]["causal_lm_input"] and report["decoder"] is None
    assert report["full_model"]["n_predictions"] > 0 and report["encoder"]["early_exit"]["layers"] == [0, 1, 2, 3]
    md = (runs["gpt2"] / "depth.md").read_text()
    assert "ln_f → tied LM head" in md and "Logit lens (transformer layer l → final norm → LM head)" in md
    for text in (md, report["summary"]):
        assert "decoder" not in text.lower() and "masked" not in text.lower()
    for name in ("contribution", "skip", "early_exit", "probe", "cka"):
        assert (runs["gpt2"] / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cut = protlm.load(report["truncated"]["path"])
    assert cut.model.encoder.n_layers == 2 and cut.model.encoder_only and cut.model.kind == "causal-lm"
    out = tmp_path / "cmp"
    assert main(["analyze", "depth", "--compare", str(runs["esm"]), str(runs["gpt2"]), "-o", str(out),
                 "--labels", "esm", "gpt2"]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert "autoregressive" in json.dumps(table) and "masked" in json.dumps(table)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_truncated_gpt2_outputs_the_normed_stream_and_round_trips(tmp_path):
    from protlm.analysis import truncate_encoder

    pre = _gpt2(seed=5)
    cut = truncate_encoder(pre.model, 2)
    assert cut.encoder.n_layers == 2 and cut.encoder_only and cut.kind == "causal-lm"
    _, b = _batch(pre)
    real = b.attention_mask.bool()
    with torch.inference_mode():
        enc = StackRunner(pre.model.encoder)
        h = enc.embed(b.input_ids, b.attention_mask)
        want = enc.normed(enc.run(h, enc.masks(h, b.attention_mask), 0)[1])[real]
        got = cut.encode(b.input_ids, b.attention_mask).last_hidden_state[real]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        protlm.save_pretrained(cut, tmp_path / "cut", pre.tokenizer)
        back = protlm.load(str(tmp_path / "cut"))
        assert back.model.encoder_only and back.model.encoder.n_layers == 2
        torch.testing.assert_close(back.model.encode(b.input_ids, b.attention_mask).last_hidden_state[real], want,
                                   rtol=0, atol=0)
