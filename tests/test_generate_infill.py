"""Infilling through the denoising sentinels: equal to a slow teacher-forced computation, seeded, validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import protlm
from protlm.generation import infill, mask_positions, parse_masked
from protlm.generation.infilling import parse_positions

from .conftest import odd_config

ALPHABET = "ACDEFGHIKLMNPQRSTVWY"


def _slow_greedy_fill(pre, template: str):
    """Left-to-right argmax with a full forward pass per position, built from the vocabulary by hand."""
    model, tok = pre.model, pre.tokenizer
    masked = [i for i, c in enumerate(template) if c == "?"]
    body = [tok.vocab[f"<extra_id_{masked.index(i)}>"] if c == "?" else tok.vocab[c] for i, c in enumerate(template)]
    enc = [tok.vocab["[NLU]"], *body, tok.vocab["</s>"]]
    ids = torch.tensor([enc])
    dec = [model.config.decoder_start_token_id]
    chosen, probs = [], []
    cols = [tok.vocab[a] for a in ALPHABET]
    for k in range(len(masked)):
        dec.append(tok.vocab[f"<extra_id_{k}>"])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), decoder_input_ids=torch.tensor([dec])).logits[0, -1]
        p = logits[cols].softmax(-1)
        j = int(p.argmax())
        chosen.append(ALPHABET[j])
        probs.append(float(p[j]))
        dec.append(cols[j])
    return "".join(chosen), probs


@pytest.mark.parametrize("template", ["MKT?AL??QRQ", "?KTAYIAKQR?", "MK?"])
def test_greedy_infill_equals_slow_computation(template):
    pre = protlm.random_init(odd_config(), seed=2)
    (res,) = infill(pre, template)
    residues, probs = _slow_greedy_fill(pre, template)
    assert res.residues == residues
    np.testing.assert_allclose(res.probabilities, probs, rtol=1e-4, atol=1e-6)
    filled = list(template)
    for pos, aa in zip(res.masked.positions, residues):
        filled[pos] = aa
    assert res.sequence == "".join(filled)
    np.testing.assert_allclose(res.distributions.sum(1), 1.0, rtol=1e-5)
    assert res.alphabet == ALPHABET


def test_sampled_infill_is_seeded():
    pre = protlm.random_init(odd_config(), seed=2)
    kw = dict(num=6, strategy="sample", temperature=3.0)
    a = infill(pre, ["MKT[?]AL[?][?]QR", "[?][?]W"], seed=1, **kw)
    b = infill(pre, ["MKT[?]AL[?][?]QR", "[?][?]W"], seed=1, batch_size=4, **kw)
    c = infill(pre, ["MKT[?]AL[?][?]QR", "[?][?]W"], seed=2, **kw)
    assert [r.sequence for r in a] == [r.sequence for r in b]
    assert [r.sequence for r in a] != [r.sequence for r in c]
    assert len({r.sequence for r in a[:6]}) > 1
    for r in a:  # the reported probability is the chosen residue's entry of the distribution
        for j, aa in enumerate(r.residues):
            assert r.probabilities[j] == pytest.approx(r.distributions[j, r.alphabet.index(aa)])


def test_masks_and_positions_parse():
    m = parse_masked("mkt[?]AL??")
    assert m.template == "MKT?AL??" and m.positions == (3, 6, 7) and m.text == "MKT[?]AL[?][?]"
    assert parse_positions("4, 7-9,4") == [4, 7, 8, 9]
    m = mask_positions("MKTAYIAK", [1, 3, 4])
    assert m.template == "?K??YIAK" and m.positions == (0, 2, 3)


def test_infill_errors_name_the_problem():
    pre = protlm.random_init(odd_config(), seed=2)
    with pytest.raises(protlm.InputError, match="no masked positions"):
        infill(pre, "MKTAL")
    with pytest.raises(protlm.InputError, match="position 12 is outside the sequence"):
        mask_positions("MKTAYIAK", [2, 12])
    with pytest.raises(protlm.InputError, match=r"masked1: unknown residue 'J' at position 2"):
        infill(pre, "MJ[?]")
    with pytest.raises(protlm.InputError, match="226 masked positions, but the vocabulary has only 225 sentinels"):
        infill(pre, "M" + "?" * 226)
    with pytest.raises(protlm.ConfigError, match="greedy infilling gives one result"):
        infill(pre, "M?", num=2)


def test_cli_infill_writes_fasta_and_table(tmp_path):
    from protlm.cli.main import main
    from protlm.data.fasta import read_fasta

    out, table = tmp_path / "filled.fasta", tmp_path / "probs.tsv"
    assert main(["infill", "debug", "--random-init", "--masked", "MKT[?]AL[?][?]QR", "-o", str(out),
                 "--table", str(table)]) == 0
    (rec,) = read_fasta(out)
    assert rec.id == "masked1_fill1" and "positions=4,7,8" in rec.description and "strategy=greedy" in rec.description
    rows = table.read_text().splitlines()
    assert rows[0].split("\t")[:5] == ["id", "sample", "position", "chosen", "p_chosen"] and len(rows) == 4
    assert main(["infill", "debug", "--random-init", "--sequence", "MKTAYIAK", "--positions", "2,9"]) == 2
