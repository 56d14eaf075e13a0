"""Completion: parity with transformers' generate, cache == no cache, seeded sampling, residue-only output."""

from __future__ import annotations

import pytest
import torch

import protlm
from protlm.generation import GenerationConfig, generate, to_fasta
from protlm.generation.decoding import Sampling, filter_logits
from protlm.generation.tokens import allowed_mask
from protlm.tokenizer.vocab import STANDARD

from .conftest import odd_config

PREFIXES = ["MKTAYIAKQRQISFVKSHFSRQ", "MSE", "GAVLIPFWMSTCYNQDEKRH", "MKKLLPTAAAGLLLLAAQPAMA", "W"]


def _pre(seed: int = 1, eos_bias: float | None = None, **cfg):
    pre = protlm.random_init(odd_config(**cfg), seed=seed)
    if eos_bias is not None:
        # A random model almost never picks </s>; give the </s> row of the LM head a copy of a residue row
        # (scaled) so that some rows end early, which exercises the finished-row bookkeeping.
        with torch.no_grad():
            w = pre.model.lm_head.weight
            w[pre.tokenizer.eos_id] = w[pre.tokenizer.residue_ids["L"]] * eos_bias
    return pre


def _hf(pre, tmp_path):
    transformers = pytest.importorskip("transformers")
    protlm.save_pretrained(pre.model, tmp_path, pre.tokenizer)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    allowed = allowed_mask(pre.tokenizer, pre.config.vocab_size)

    class ResiduesOnly(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    return hf, transformers.LogitsProcessorList([ResiduesOnly()])


def _hf_continuations(pre, hf, processors, prefixes, **kwargs):
    tok = pre.tokenizer
    batch = tok.batch_encode(prefixes, prefix="s2s")
    out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_processor=processors,
                      do_sample=False, return_dict_in_generate=True, output_scores=True, **kwargs)
    conts = []
    for row in out.sequences.tolist():
        row = row[1:]  # the decoder start token
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        conts.append(tok.decode(row))
    return conts, out


@pytest.mark.parametrize("eos_bias", [None, 1.5])
def test_greedy_equals_transformers_generate(tmp_path, eos_bias):
    pre = _pre(eos_bias=eos_bias)
    hf, processors = _hf(pre, tmp_path)
    expected, _ = _hf_continuations(pre, hf, processors, PREFIXES, max_new_tokens=25, num_beams=1)
    ours = generate(pre, PREFIXES, strategy="greedy", max_new_tokens=25, batch_size=2)
    assert [c.continuation for c in ours] == expected
    if eos_bias is not None:  # the biased model must really end some rows early, or the test proves less
        assert any(c.stop == "eos" for c in ours) and any(c.stop == "length" for c in ours)


def test_beam_search_equals_transformers(tmp_path):
    pre = _pre(eos_bias=1.2)
    hf, processors = _hf(pre, tmp_path)
    expected, out = _hf_continuations(pre, hf, processors, PREFIXES, max_new_tokens=12, num_beams=3,
                                      num_return_sequences=2, early_stopping=True, length_penalty=1.0)
    ours = generate(pre, PREFIXES, strategy="beam", num_beams=3, num_return=2, max_new_tokens=12)
    assert [c.continuation for c in ours] == expected
    torch.testing.assert_close(torch.tensor([c.score for c in ours]), out.sequences_scores.float(), rtol=1e-4, atol=1e-4)
    assert any(c.stop == "eos" for c in ours)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_cached_decode_equals_uncached(strategy):
    pre = _pre(eos_bias=1.3)
    kw = dict(strategy=strategy, max_new_tokens=15, seed=5)
    if strategy == "beam":
        kw.update(num_beams=3, num_return=2)
    if strategy == "sample":
        kw.update(num_return=3, top_k=8)
    fast = generate(pre, PREFIXES, **kw)
    slow = generate(pre, PREFIXES, use_cache=False, **kw)
    assert [c.continuation for c in fast] == [c.continuation for c in slow]
    torch.testing.assert_close(torch.tensor([c.log_prob for c in fast], dtype=torch.float64),
                               torch.tensor([c.log_prob for c in slow], dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_cache_logits_match_full_decoder_pass():
    pre = _pre()
    model, tok = pre.model, pre.tokenizer
    batch = tok.batch_encode(PREFIXES[:3], prefix="s2s")
    dec = torch.randint(7, 27, (3, 9))
    dec[:, 0] = 0
    with torch.no_grad():
        enc = model.encode(batch.input_ids, batch.attention_mask).last_hidden_state
        full = model.lm_logits(model.decode(dec, enc, batch.attention_mask).last_hidden_state)
        cache = model.new_cache()
        steps = [model.lm_logits(model.decode(dec[:, i:i + 1], enc, batch.attention_mask, cache=cache).last_hidden_state)
                 for i in range(dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_batching():
    pre = _pre()
    kw = dict(strategy="sample", num_return=3, max_new_tokens=10, temperature=1.3, top_p=0.9)
    a = generate(pre, PREFIXES, seed=11, batch_size=4, **kw)
    b = generate(pre, PREFIXES, seed=11, batch_size=4, **kw)
    c = generate(pre, PREFIXES, seed=11, batch_size=1, **kw)
    alone = generate(pre, PREFIXES[:1], seed=11, batch_size=7, **kw)  # same input index, other batch mates
    e = generate(pre, PREFIXES, seed=12, batch_size=4, **kw)
    seqs = [x.sequence for x in a]
    assert seqs == [x.sequence for x in b] == [x.sequence for x in c]
    assert [x.sequence for x in alone] == seqs[:3]
    assert [x.sequence for x in e] != seqs
    assert len({x.continuation for x in a if x.id == "prefix1"}) > 1  # the samples of one prefix differ


def test_only_residues_are_generated_even_when_specials_dominate():
    pre = _pre()
    tok = pre.tokenizer
    with torch.no_grad():  # make sentinels, prefixes, <unk> and X the model's favourites
        w = pre.model.lm_head.weight
        for i in [*tok.sentinel_ids[:20], tok.unk_id, tok.prefix_ids["nlu"], tok.residue_ids["X"], tok.pad_id]:
            w[i] = w[tok.residue_ids["A"]] * 10
    for strategy in ("greedy", "sample", "beam"):
        kw = {"num_beams": 2} if strategy == "beam" else {"temperature": 2.0} if strategy == "sample" else {}
        out = generate(pre, PREFIXES, strategy=strategy, max_new_tokens=30, **kw)
        assert all(set(c.continuation) <= set(STANDARD) for c in out)
    out = generate(pre, PREFIXES, strategy="greedy", max_new_tokens=30, residues="all")
    assert any("X" in c.continuation for c in out)  # with residues="all" the favoured X is allowed


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    pre = _pre()
    greedy = generate(pre, PREFIXES, strategy="greedy", max_new_tokens=12)
    topk1 = generate(pre, PREFIXES, strategy="sample", top_k=1, max_new_tokens=12, seed=3)
    assert [c.continuation for c in greedy] == [c.continuation for c in topk1]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, Sampling(top_p=0.75)).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    kept = filter_logits(logits, Sampling(top_p=0.8)).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8: the third is not needed
    kept = filter_logits(logits, Sampling(top_p=0.81)).isfinite()[0].tolist()
    assert kept == [True, True, True, False]


def test_length_ratio_caps_each_prefix():
    pre = _pre()
    out = generate(pre, PREFIXES, strategy="greedy", length_ratio=0.5)
    for c in out:
        assert 1 <= len(c.continuation) <= -(-len(c.prefix) // 2)
        assert c.stop == "length" or len(c.continuation) < -(-len(c.prefix) // 2)


def test_bad_inputs_name_the_problem():
    pre = _pre()
    with pytest.raises(protlm.InputError, match="empty prefix"):
        generate(pre, {"p1": "MKT", "p2": ""})
    with pytest.raises(protlm.InputError, match=r"p1: unknown residue 'J' at position 3"):
        generate(pre, {"p1": "MKJ"})
    with pytest.raises(protlm.InputError, match="above the limit of 4096"):
        generate(pre, "MKT", max_new_tokens=5000)
    with pytest.raises(protlm.InputError, match=r"long: prefix has 50 residues, above the limit of 40"):
        generate(pre, {"long": "A" * 50}, max_length=40)
    with pytest.raises(protlm.InputError, match="length ratio 3 asks for 150 new tokens"):
        generate(pre, {"r": "A" * 50}, length_ratio=3.0, max_length=100)
    with pytest.raises(protlm.ConfigError, match="greedy decoding gives one sequence"):
        generate(pre, "MKT", strategy="greedy", num_return=2)
    with pytest.raises(protlm.ConfigError, match="encoder-only"):
        generate(protlm.random_init(odd_config(), encoder_only=True), "MKT")


def test_fasta_headers_carry_the_settings():
    pre = _pre()
    cfg = GenerationConfig(strategy="sample", num_return=2, max_new_tokens=7, temperature=0.8, top_k=5, seed=9)
    text = to_fasta(generate(pre, {"q": "MKT"}, cfg), cfg)
    headers = [line for line in text.splitlines() if line.startswith(">")]
    assert headers[0].startswith(">q_gen1 prefix_len=3 ") and headers[1].startswith(">q_gen2 ")
    for h in headers:
        assert "strategy=sample" in h and "temperature=0.8" in h and "top_k=5" in h and "seed=9" in h
        assert "max_new_tokens=7" in h


def test_top_level_api_is_callable_before_and_after_the_package_import():
    import importlib

    pre = _pre()
    first = protlm.generate(pre, "MKT", strategy="greedy", max_new_tokens=4)
    importlib.import_module("protlm.generation.completion")  # binds protlm.generation, never protlm.generate
    second = protlm.generate(pre, "MKT", strategy="greedy", max_new_tokens=4)
    assert first == second


def test_cli_generate_writes_fasta(tmp_path):
    from protlm.cli.main import main
    from protlm.data.fasta import read_fasta

    prefixes = tmp_path / "p.fasta"
    prefixes.write_text(">a\nMKTAYIAK\n>b\nMSE\n")
    out = tmp_path / "out.fasta"
    code = main(["generate", "debug", "--random-init", "--input", str(prefixes), "--num", "2", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--top-p", "0.95", "--seed", "4", "-o", str(out)])
    assert code == 0
    records = list(read_fasta(out))
    assert [r.id for r in records] == ["a_gen1", "a_gen2", "b_gen1", "b_gen2"]
    assert all(r.sequence.startswith("MKTAYIAK") for r in records[:2])
    assert "temperature=0.9" in records[0].description and "top_p=0.95" in records[0].description
    assert main(["generate", "debug", "--random-init", "--prefix", "MKT", "--greedy", "--top-k", "3"]) == 2
    assert main(["generate", "debug", "--random-init", "--prefix", "MKT", "--max-new-tokens", "100000"]) == 2


def test_min_new_tokens_holds_back_eos_like_transformers(tmp_path):
    pre = _pre(eos_bias=1.5)
    hf, processors = _hf(pre, tmp_path)
    expected, _ = _hf_continuations(pre, hf, processors, PREFIXES, max_new_tokens=16, min_new_tokens=6, num_beams=1)
    ours = generate(pre, PREFIXES, strategy="greedy", max_new_tokens=16, min_new_tokens=6)
    assert [c.continuation for c in ours] == expected
    assert all(len(c.continuation) >= 6 for c in ours) and any(c.stop == "eos" for c in ours)


def test_cli_generate_resumes_a_killed_job_exactly(tmp_path, monkeypatch):
    import protlm.cli.generate as cli_generate
    import protlm.generation as gen_pkg
    from protlm.cli.main import main

    monkeypatch.setattr(cli_generate, "PART", 2)
    prefixes = tmp_path / "p.fasta"
    prefixes.write_text("".join(f">p{i}\nMKTAYIAKQR"[: 12 + i] + "\n" for i in range(5)))
    argv = ["generate", "debug", "--random-init", "--input", str(prefixes), "--max-new-tokens", "5", "--seed", "3"]
    whole = tmp_path / "whole.fasta"
    assert main([*argv, "-o", str(whole)]) == 0

    real, calls = gen_pkg.generate, []

    def dies_on_second_part(*a, **k):
        calls.append(k.get("first_index"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen_pkg, "generate", dies_on_second_part)
    out = tmp_path / "out.fasta"
    assert main([*argv, "-o", str(out)]) == 130  # Ctrl-C during the second part
    assert not out.exists() and (tmp_path / "out.fasta.partial").read_text().count(">") == 2
    monkeypatch.setattr(gen_pkg, "generate", real)
    assert main([*argv, "-o", str(out)]) == 0
    assert out.read_text() == whole.read_text()
    assert not (tmp_path / "out.fasta.partial").exists() and not (tmp_path / "out.fasta.partial.json").exists()

    # a partial file left by other settings is never mixed in
    (tmp_path / "o2.fasta.partial").write_text(">x\nM\n")
    (tmp_path / "o2.fasta.partial.json").write_text('{"job": "other", "done": 1, "bytes": 5}')
    assert main([*argv, "--seed", "4", "-o", str(tmp_path / "o2.fasta")]) == 2
