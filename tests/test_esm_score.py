"""Masked-LM (ESM-2) scoring and infilling: every number equals one computed directly from
``transformers.EsmForMaskedLM`` logits on the same weights; CLI end to end; refusals in one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from protlm.config import EsmConfig
from protlm.convert import load, save_pretrained
from protlm.generation import infill, pseudo_log_likelihood, score_variants

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
VARIANTS = ["A4G", "K2R:A4G", "WT", "Q11W:K2R:L27P", "A4A", "M1C"]
NOT_RESIDUES = ("<cls>", "<pad>", "<eos>", "<unk>", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")


def _config(**kw) -> EsmConfig:
    # odd sizes; a wide init so that the predictions are far from uniform and a wrong position shows
    base = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
                initializer_range=0.3)
    return EsmConfig(**{**base, **kw})


def _with_hf(tmp_path_factory, name: str, **kw):
    """(protlm model, EsmForMaskedLM with the same weights, checkpoint dir). Non-residue tokens get a large
    output bias, so that any code that lets them through the softmax gives visibly different numbers."""
    transformers = pytest.importorskip("transformers")
    pre = load(_config(**kw), random_init=True, dtype="fp32", seed=5)
    with torch.no_grad():
        for t in NOT_RESIDUES:
            pre.model.lm_head.bias[pre.tokenizer.vocab[t]] = 8.0
    path = tmp_path_factory.mktemp(name)
    save_pretrained(pre.model, path, pre.tokenizer)
    hf = transformers.EsmForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()
    return pre, hf, path


@pytest.fixture(scope="module")
def esm(tmp_path_factory):
    return _with_hf(tmp_path_factory, "esm")


@pytest.fixture(scope="module")
def short_window(tmp_path_factory):
    from protlm.model.esm import ESM

    # a model whose window is 10 residues (max_position_embeddings also counts <cls>, <eos> and any offset)
    overhead = 100 - ESM(_config(max_position_embeddings=100)).max_residues
    return _with_hf(tmp_path_factory, "esm_window", max_position_embeddings=10 + overhead)


def _hf_logprobs(hf, tok, seq: str, masked=(), restrict: bool = False) -> torch.Tensor:
    """(len(seq), V) log-probabilities at each residue from one unpadded EsmForMaskedLM pass."""
    ids = [tok.vocab["<cls>"], *[tok.vocab["<mask>"] if i in masked else tok.vocab[c] for i, c in enumerate(seq)],
           tok.vocab["<eos>"]]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    logits = logits[0, 1:-1].double()
    if restrict:  # protlm's probabilities are over the 20 standard residues
        keep = torch.full((logits.shape[-1],), float("-inf"), dtype=torch.double)
        keep[[tok.vocab[a] for a in STANDARD]] = 0
        logits = logits + keep
    return logits.log_softmax(-1)


def _direct_marginals(hf, tok, wt: str, variants, wt_marginal: bool, window=None) -> list[float]:
    """fair-esm's definitions, full-vocabulary softmax as in its predict.py; ``window(p)`` gives the start of the
    window the position is read from (long wild types)."""
    from protlm.generation import parse_variant

    out = []
    for text in variants:
        total = 0.0
        for m in parse_variant(text, wt).mutations:
            s = window(m.position) if window else 0
            seg = wt[s:s + 10] if window else wt
            p = m.position - s
            lp = _hf_logprobs(hf, tok, seg, masked=() if wt_marginal else (p,))[p]
            total += float(lp[tok.vocab[m.mut]] - lp[tok.vocab[m.wt]])
        out.append(total)
    return out


@pytest.mark.parametrize("strategy", ["masked-marginal", "wt-marginal"])
def test_marginals_equal_transformers(esm, strategy):
    pre, hf, _ = esm
    direct = _direct_marginals(hf, pre.tokenizer, WT, VARIANTS, strategy == "wt-marginal")
    for budget in (40, 10**6):  # one window per batch, then all in one batch
        ours = score_variants(pre, WT, VARIANTS, strategy=strategy, token_budget=budget)
        assert np.abs(ours - direct).max() <= 1e-5
    assert ours[2] == 0 and ours[4] == 0  # the wild type and a synonymous "mutation"
    assert np.abs(np.asarray(direct)).max() > 0.1  # the scores are not trivially zero


def test_long_wildtype_uses_windows(short_window):
    pre, hf, _ = short_window
    assert pre.model.max_residues == 10
    # masked marginal: the 10-residue window centred on the position, kept inside the 33-residue wild type
    variants = ["M1C", "K8R", "F19A", "Q33E", "K8R:Q33E"]
    ours = score_variants(pre, WT, variants)
    direct = _direct_marginals(hf, pre.tokenizer, WT, variants, False, window=lambda p: min(max(0, p - 5), 23))
    assert np.abs(ours - direct).max() <= 1e-5
    # wt marginal: tiles start at 0, 5, 10, 15, 20 and 23; position 3 is read from 0, 15 from 10, 33 from 23
    ours = score_variants(pre, WT, ["A4G", "V15L", "Q33E"], strategy="wt-marginal")
    direct = [_direct_marginals(hf, pre.tokenizer, WT, [v], True, window=lambda p, s=s: s)[0]
              for v, s in (("A4G", 0), ("V15L", 10), ("Q33E", 23))]
    assert np.abs(ours - direct).max() <= 1e-5


def test_pll_equals_transformers_with_padded_batches(esm):
    pre, hf, _ = esm
    tok = pre.tokenizer
    records = [("long", WT), ("short", "MKTAYIAK"), ("shorter", "GLIEVQW")]
    direct = []
    for _, seq in records:
        direct.append(np.array([float(_hf_logprobs(hf, tok, seq, masked=(i,), restrict=True)[i, tok.vocab[c]])
                                for i, c in enumerate(seq)]))
    # one batch holds copies of all three lengths (padded); the small budget runs each copy alone
    for budget in (10**6, 1):
        ours = pseudo_log_likelihood(pre, records, token_budget=budget, per_position=True)
        assert [len(o) for o in ours] == [len(s) for _, s in records]
        assert max(np.abs(o - d).max() for o, d in zip(ours, direct)) <= 1e-5
    totals = pseudo_log_likelihood(pre, records)
    np.testing.assert_allclose(totals, [d.sum() for d in direct], atol=1e-4)


def test_pll_refuses_nonstandard_residue(esm):
    from protlm.errors import InputError

    with pytest.raises(InputError, match="s2: residue 'X' at position 3"):
        pseudo_log_likelihood(esm[0], [("s1", "MKT"), ("s2", "MKXA")])


def test_infill_predicts_residues_only_from_one_pass(esm):
    pre, hf, _ = esm
    tok = pre.tokenizer
    templates = ["MKT?AL??QRQ", "?KTAYIAKQR?EE", "??W"]  # different lengths: one padded batch
    results = infill(pre, templates)
    for template, r in zip(templates, results):
        masked = [i for i, c in enumerate(template) if c == "?"]
        lp = _hf_logprobs(hf, tok, template.replace("?", "A"), masked=masked, restrict=True)[masked]
        cols = [tok.vocab[a] for a in STANDARD]
        expected = "".join(STANDARD[j] for j in lp[:, cols].argmax(-1).tolist())
        assert r.residues == expected
        np.testing.assert_allclose(r.probabilities, lp[:, cols].max(-1).values.exp().numpy(), atol=1e-5)
        assert all(a == b for a, b in zip(template, r.sequence) if a != "?")  # unmasked positions kept
        assert len(r.sequence) == len(template)
    # sampling at a high temperature still only draws standard residues
    sampled = infill(pre, templates, num=8, strategy="sample", temperature=5.0, seed=3)
    assert len(sampled) == 24 and all(set(s.residues) <= set(STANDARD) for s in sampled)
    assert len({s.residues for s in sampled if s.id == "masked1"}) > 1
    again = infill(pre, templates[:1], num=8, strategy="sample", temperature=5.0, seed=3)
    assert [s.sequence for s in again] == [s.sequence for s in sampled[:8]]  # seeded, independent of other inputs


def test_cli_end_to_end(esm, tmp_path, capsys):
    from protlm.cli.main import main
    from protlm.data.fasta import read_fasta

    pre, _, path = esm
    variants = tmp_path / "variants.csv"
    variants.write_text("mutant,fitness\n" + "".join(f"{v},{i}\n" for i, v in enumerate(VARIANTS)))
    for strategy in ("masked-marginal", "wt-marginal"):
        out = tmp_path / f"{strategy}.csv"
        assert main(["score", str(path), "--dtype", "fp32", "--wildtype", WT, "--variants", str(variants),
                     "--strategy", strategy, "-o", str(out)]) == 0
        got = [float(r["score"]) for r in csv.DictReader(out.open())]
        np.testing.assert_allclose(got, score_variants(pre, WT, VARIANTS, strategy=strategy), rtol=1e-5, atol=1e-6)
    seqs = tmp_path / "seqs.fasta"
    seqs.write_text(">a\nMKTAYIAK\n>b\nGLIEVQW\n")
    pll = tmp_path / "pll.csv"
    assert main(["score", str(path), "--dtype", "fp32", "--pll", "--input", str(seqs), "--token-budget", "50",
                 "-o", str(pll)]) == 0
    rows = list(csv.DictReader(pll.open()))
    np.testing.assert_allclose([float(r["pll"]) for r in rows],
                               pseudo_log_likelihood(pre, ["MKTAYIAK", "GLIEVQW"]), rtol=1e-5)
    filled = tmp_path / "filled.fasta"
    assert main(["infill", str(path), "--dtype", "fp32", "--masked", "MKT[?]AL[?][?]QR", "-o", str(filled)]) == 0
    (rec,) = read_fasta(filled)
    assert rec.sequence[:3] == "MKT" and rec.sequence[4:6] == "AL" and set(rec.sequence) <= set(STANDARD)
    assert rec.sequence == infill(pre, "MKT?AL??QR")[0].sequence


def test_random_init_preset_scores(tmp_path):
    from protlm.cli.main import main

    variants = tmp_path / "v.csv"
    variants.write_text("mutant\nA4G\nK2R:A4G\n")
    out = tmp_path / "s.csv"
    assert main(["score", "esm2_t6_8M", "--random-init", "--wildtype", WT[:12], "--variants", str(variants),
                 "-o", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 2


def test_refusals_are_one_line(esm, tmp_path, capsys):
    from protlm.cli.main import main

    pre, _, path = esm
    variants = tmp_path / "v.csv"
    variants.write_text("mutant\nA4G\nK2R:T4G\n")
    assert main(["score", str(path), "--wildtype", WT, "--variants", str(variants)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line 3" in err and "'K2R:T4G'" in err and "position 4 is A" in err
    assert main(["generate", str(path), "--prefix", "MKT"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("protlm generate: error:") and "infill" in err[-1] and "Traceback" not in "".join(err)
    variants.write_text("mutant\nA4G\n")
    assert main(["score", str(path), "--wildtype", WT, "--variants", str(variants), "--strategy", "joint"]) == 2
    assert "does not apply to masked-lm models" in capsys.readouterr().err


def test_t5_refuses_wt_marginal():
    import protlm
    from protlm.errors import ConfigError

    from .conftest import odd_config

    with pytest.raises(ConfigError, match="'wt-marginal' does not apply to encoder-decoder models"):
        score_variants(protlm.random_init(odd_config()), WT, ["A4G"], strategy="wt-marginal")
