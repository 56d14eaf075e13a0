"""Zero-shot scoring: masked marginals, joint scores and PLL equal direct slow computations; notation; BLOSUM62."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

import protlm
from protlm.generation import (
    blosum62_scores, masked_marginals, parse_variant, pseudo_log_likelihood, score_variants, variant_from_sequence,
)
from protlm.generation.blosum import BLOSUM62, BLOSUM62_ORDER, blosum62

from .conftest import DATA, odd_config

WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
VARIANTS = ["A4G", "K2R:A4G", "WT", "Q11W:K2R", "M1A:K2R:T3S:L27P", "A4A"]


def _pre(seed: int = 3):
    return protlm.random_init(odd_config(), seed=seed)


def _encoder_ids(tok, seq: str, masked: list[int]) -> torch.Tensor:
    body = [tok.vocab[f"<extra_id_{masked.index(i)}>"] if i in masked else tok.vocab[c] for i, c in enumerate(seq)]
    return torch.tensor([[tok.vocab["[NLU]"], *body, tok.vocab["</s>"]]])


def _slow_logprobs(pre, seq: str, pos: int) -> torch.Tensor:
    """log p(. | seq with pos masked) from one plain forward pass, no cache, ids built by hand."""
    tok, model = pre.tokenizer, pre.model
    ids = _encoder_ids(tok, seq, [pos])
    dec = torch.tensor([[model.config.decoder_start_token_id, tok.vocab["<extra_id_0>"]]])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), decoder_input_ids=dec).logits[0, -1].log_softmax(-1)


def test_masked_marginal_scores_equal_slow_computation():
    pre = _pre()
    fast = score_variants(pre, WT, VARIANTS, token_budget=100)  # a small budget forces several batches
    vocab = pre.tokenizer.vocab
    slow = []
    for text in VARIANTS:
        total = 0.0
        for m in parse_variant(text, WT).mutations:
            lp = _slow_logprobs(pre, WT, m.position)
            total += float(lp[vocab[m.mut]] - lp[vocab[m.wt]])
        slow.append(total)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)
    assert fast[2] == 0 and fast[5] == 0  # wild type and a synonymous "mutation"
    assert abs(fast[1] - (fast[0] + score_variants(pre, WT, ["K2R"])[0])) < 1e-5  # additive over positions


def test_joint_scores_equal_slow_chain_rule():
    pre = _pre()
    tok, model = pre.tokenizer, pre.model
    fast = score_variants(pre, WT, VARIANTS, strategy="joint", token_budget=80)

    def chain_logprob(positions, residues):
        ids = _encoder_ids(tok, WT, positions)
        dec = [model.config.decoder_start_token_id]
        total = 0.0
        for k, aa in enumerate(residues):
            dec.append(tok.vocab[f"<extra_id_{k}>"])
            with torch.no_grad():
                lp = model(ids, torch.ones_like(ids), decoder_input_ids=torch.tensor([dec])).logits[0, -1].log_softmax(-1)
            total += float(lp[tok.vocab[aa]])
            dec.append(tok.vocab[aa])
        return total

    for text, score in zip(VARIANTS, fast):
        v = parse_variant(text, WT)
        if not v.mutations:
            assert score == 0
            continue
        pos = list(v.positions)
        expected = chain_logprob(pos, [m.mut for m in v.mutations]) - chain_logprob(pos, [m.wt for m in v.mutations])
        assert score == pytest.approx(expected, abs=1e-4)
    single = score_variants(pre, WT, ["A4G", "Q11W"])
    np.testing.assert_allclose(score_variants(pre, WT, ["A4G", "Q11W"], strategy="joint"), single, atol=1e-5)


def test_pseudo_log_likelihood_equals_slow_sum():
    pre = _pre()
    seqs = [WT[:12], "MSEQWYH"]
    fast = pseudo_log_likelihood(pre, seqs, token_budget=30)
    vocab = pre.tokenizer.vocab
    for seq, value in zip(seqs, fast):
        slow = sum(float(_slow_logprobs(pre, seq, i)[vocab[c]]) for i, c in enumerate(seq))
        assert value == pytest.approx(slow, abs=1e-3)
    per_pos = pseudo_log_likelihood(pre, seqs, per_position=True)
    assert [len(p) for p in per_pos] == [12, 7] and np.all(per_pos[0] < 0)


def test_marginal_table_matches_scores():
    pre = _pre()
    table = masked_marginals(pre, WT, [3, 1])
    assert table.positions == (1, 3) and table.log_probs.shape == (2, 20)
    assert np.all(np.exp(table.log_probs).sum(1) <= 1 + 1e-6)
    expected = table.log_prob(3, "G") - table.log_prob(3, "A")
    assert score_variants(pre, WT, ["A4G"])[0] == pytest.approx(expected)


def test_variant_notation_and_errors():
    v = parse_variant("K2R:a4g", WT)
    assert [(m.wt, m.position, m.mut) for m in v.mutations] == [("K", 1, "R"), ("A", 3, "G")]
    assert v.apply(WT) == "MRTGY" + WT[5:] and v.label() == "K2R:A4G"
    assert parse_variant("K1R", WT, first_index=0).mutations[0].position == 1
    with pytest.raises(protlm.InputError, match=r"variant 'A23G': A23G but position 23 is L in the wild type"):
        parse_variant("A23G", WT)
    with pytest.raises(protlm.InputError, match=r"position 40 is outside the wild type \(1\.\.33\)"):
        parse_variant("K2R:A40G", WT)
    with pytest.raises(protlm.InputError, match=r"unknown residue 'B' in A4B"):
        parse_variant("A4B", WT)
    with pytest.raises(protlm.InputError, match="position 4 is mutated twice"):
        parse_variant("A4G:A4C", WT)
    with pytest.raises(protlm.InputError, match=r"cannot read mutation '4G'"):
        parse_variant("4G", WT)
    with pytest.raises(protlm.InputError, match="variants.csv line 3: variant 'A5G'"):
        parse_variant("A5G", WT, where="variants.csv line 3")


def test_variants_from_full_sequences():
    mutated = "MRTG" + WT[4:]
    v = variant_from_sequence(mutated, WT)
    assert v.label() == "K2R:A4G" and v.apply(WT) == mutated
    assert variant_from_sequence(WT, WT).mutations == ()
    with pytest.raises(protlm.InputError, match="sequence has 32 residues but the wild type has 33"):
        variant_from_sequence(WT[:-1], WT)


def test_blosum62_is_the_published_matrix():
    assert BLOSUM62.shape == (20, 20) and (BLOSUM62 == BLOSUM62.T).all()
    diag = dict(zip(BLOSUM62_ORDER, np.diag(BLOSUM62)))
    assert diag == {"A": 4, "R": 5, "N": 6, "D": 6, "C": 9, "Q": 5, "E": 5, "G": 6, "H": 8, "I": 4, "L": 4, "K": 5,
                    "M": 5, "F": 6, "P": 7, "S": 4, "T": 5, "W": 11, "Y": 7, "V": 4}
    assert (blosum62("W", "F"), blosum62("I", "V"), blosum62("D", "E"), blosum62("W", "D")) == (1, 3, 2, -4)
    scores = blosum62_scores([parse_variant(t, WT) for t in ["A4G", "K2R:A4G", "WT", "A4A"]])
    assert scores.tolist() == [0.0, 2.0, 0.0, 0.0]


def _gb1():
    from protlm.data.fasta import read_fasta

    (wt,) = read_fasta(os.path.join(DATA, "gb1_5LDE_1.fasta"))
    return wt.sequence, os.path.join(DATA, "flip_gb1_three_vs_rest_excerpt.csv")


def test_cli_score_flip_sequences_with_spearman(tmp_path, capsys):
    from protlm.cli.main import main

    wt, variants = _gb1()
    out = tmp_path / "scores.csv"
    args = ["--wildtype", os.path.join(DATA, "gb1_5LDE_1.fasta"), "--variants", variants, "--where", "set=test",
            "--target", "target", "-o", str(out)]
    assert main(["score", "debug", "--random-init", *args]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 30 and all(r["set"] == "test" for r in rows)
    for r in rows[:5]:  # the derived notation re-applies to the row's sequence; GB1 sites are 39, 40, 41, 54
        v = parse_variant(r["mutations"], wt)
        assert v.apply(wt) == r["sequence"] and set(v.positions) <= {38, 39, 40, 53}
    summary = json.loads((tmp_path / "scores.csv.json").read_text())
    assert summary["n"] == 30 and summary["n_target"] == 30 and -1 <= summary["spearman"] <= 1
    assert "spearman rho" in capsys.readouterr().err
    # the CLI's scores are the API's scores
    pre = protlm.random_init("debug", seed=0)
    api = score_variants(pre, wt, [r["mutations"] for r in rows])
    np.testing.assert_allclose([float(r["score"]) for r in rows], api, rtol=1e-4, atol=1e-5)
    assert main(["score", "blosum62", *args]) == 0


def test_cli_score_mutation_column_and_errors(tmp_path, capsys):
    from protlm.cli.main import main

    wt_fasta = tmp_path / "wt.fasta"
    wt_fasta.write_text(f">wt\n{WT}\n")
    good = tmp_path / "v.csv"
    good.write_text("mutant,fitness\nA4G,0.5\nK2R:A4G,0.1\nWT,1.0\n")
    out = tmp_path / "s.csv"
    assert main(["score", "debug", "--random-init", "--wildtype", str(wt_fasta), "--variants", str(good),
                 "-o", str(out)]) == 0
    assert [r["mutations"] for r in csv.DictReader(open(out))] == ["A4G", "K2R:A4G", "WT"]
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("mutant\nA4G\nA23G\n")
    assert main(["score", "debug", "--random-init", "--wildtype", str(wt_fasta), "--variants", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 3: variant 'A23G': A23G but position 23 is L" in err and err.count("\n") == 1


def test_cli_pll(tmp_path):
    from protlm.cli.main import main

    seqs = tmp_path / "s.fasta"
    seqs.write_text(">a\nMKTAYIAK\n>b\nMSEQ\n")
    out = tmp_path / "pll.csv"
    assert main(["score", "debug", "--random-init", "--pll", "--input", str(seqs), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    pre = protlm.random_init("debug", seed=0)
    expected = pseudo_log_likelihood(pre, ["MKTAYIAK", "MSEQ"])
    np.testing.assert_allclose([float(r["pll"]) for r in rows], expected, rtol=1e-4)


def test_cli_pll_resumes_a_killed_job(tmp_path, monkeypatch):
    import protlm.cli.score as cli_score
    import protlm.generation as gen_pkg
    from protlm.cli.main import main

    monkeypatch.setattr(cli_score, "PLL_PART", 2)
    seqs = tmp_path / "s.fasta"
    seqs.write_text(">a\nMKTAYIAK\n>b\nMSEQ\n>c\nMKV\n>d\nMLLA\n>e\nMAG\n")
    argv = ["score", "debug", "--random-init", "--pll", "--input", str(seqs)]
    whole = tmp_path / "whole.csv"
    assert main([*argv, "-o", str(whole)]) == 0

    real, calls = gen_pkg.pseudo_log_likelihood, []

    def dies_on_second_part(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen_pkg, "pseudo_log_likelihood", dies_on_second_part)
    out = tmp_path / "pll.csv"
    assert main([*argv, "-o", str(out)]) == 130
    assert not out.exists() and len((tmp_path / "pll.csv.partial").read_text().splitlines()) == 3  # header + 2
    monkeypatch.setattr(gen_pkg, "pseudo_log_likelihood", real)
    assert main([*argv, "-o", str(out)]) == 0
    assert out.read_text() == whole.read_text() and len(out.read_text().splitlines()) == 6
    assert (tmp_path / "pll.csv.json").exists() and not (tmp_path / "pll.csv.partial.json").exists()


def test_cli_random_twin_of_a_checkpoint(tmp_path):
    from protlm.cli.main import main

    trained = protlm.random_init(odd_config(), seed=7)
    protlm.save_pretrained(trained.model, tmp_path / "ckpt", trained.tokenizer)
    seqs = tmp_path / "s.fasta"
    seqs.write_text(">a\nMKTAYIAK\n")
    for extra, seed in (([], 7), (["--random-init", "--init-seed", "5"], 5)):
        out = tmp_path / f"pll{seed}.csv"
        assert main(["score", str(tmp_path / "ckpt"), *extra, "--pll", "--input", str(seqs), "-o", str(out)]) == 0
        (row,) = csv.DictReader(open(out))
        expected = pseudo_log_likelihood(protlm.random_init(odd_config(), seed=seed), ["MKTAYIAK"])[0]
        assert float(row["pll"]) == pytest.approx(expected, rel=1e-4)
