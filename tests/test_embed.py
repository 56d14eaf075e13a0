"""Embedding correctness: slicing, pooling, batch independence, windows, parity with transformers, fp16 guard."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import protlm
from protlm.data.fasta import read_fasta
from protlm.embedding.batching import plan_batches, split, window_starts
from protlm.embedding.run import EmbedOptions, _Run, embed_iter
from protlm.errors import ConfigError, InputError

from tests.conftest import DATA, odd_config

ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")


def _seqs(n=12):
    return {r.id: r.sequence for r in list(read_fasta(ECOLI))[:n]}


@pytest.fixture(scope="module")
def ankh3_model():
    return protlm.random_init(odd_config(), seed=3, encoder_only=True)


# --- planning --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,window,overlap", [(10, 10, 3), (11, 10, 3), (100, 10, 3), (1000, 64, 20),
                                                   (35000, 4000, 1000), (4001, 4000, 1000), (57, 8, 0)])
def test_windows_partition_the_protein_and_keep_context(length, window, overlap):
    units = split(0, length, window, overlap)
    assert [u.start for u in units] == window_starts(length, window, overlap)
    covered = np.zeros(length, int)
    for u in units:
        assert 0 <= u.start <= u.keep_start < u.keep_end <= u.end <= length
        assert u.length == min(window, length)
        covered[u.keep_start:u.keep_end] += 1
        # every kept residue has >= overlap // 2 context on each side, or the protein's true end
        if u.keep_start > 0:
            assert u.keep_start - u.start >= overlap // 2
        if u.keep_end < length:
            assert u.end - u.keep_end >= overlap // 2
    assert (covered == 1).all()


def test_batches_respect_the_token_budget_and_sort_by_length():
    lengths = [5, 300, 40, 41, 42, 7, 1000, 3, 3, 3]
    units = [u for i, n in enumerate(lengths) for u in split(i, n, 4000, 1000)]
    batches = plan_batches(units, max_tokens=128, extra_tokens=2)
    assert sorted(u.seq for b in batches for u in b) == list(range(len(lengths)))
    widths = [max(u.length for u in b) + 2 for b in batches]
    assert widths == sorted(widths, reverse=True)
    for b, w in zip(batches, widths):
        assert len(b) * w <= 128 or len(b) == 1  # a row longer than the budget runs alone
    assert [len(b) for b in batches][:2] == [1, 1]  # 1000 and 300 alone


# --- correctness -----------------------------------------------------------------------------------------------
def test_prefix_follows_family_and_is_stripped(ankh3_model):
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    out = protlm.embed(ankh3_model, {"a": seq}, per_residue=True)["a"]
    assert out.shape == (len(seq), ankh3_model.config.d_model)
    tok = ankh3_model.tokenizer
    ids = torch.tensor([tok.encode(seq, prefix="nlu")])
    assert ids[0, 0].item() == tok.prefix_ids["nlu"] and ids[0, -1].item() == tok.eos_id
    with torch.no_grad():
        ref = ankh3_model.model.encode(ids).last_hidden_state[0, 1:-1].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)
    pooled = protlm.embed(ankh3_model, {"a": seq})["a"]
    np.testing.assert_allclose(pooled, ref.mean(0), atol=1e-6)
    # Ankh and ProtT5 have no prefix by default
    ankh = protlm.random_init(odd_config(protlm_family="ankh"), seed=3, encoder_only=True)
    assert _Run(ankh, EmbedOptions(), True).prefix == "none"
    assert _Run(ankh3_model, EmbedOptions(), True).prefix == "nlu"
    assert _Run(ankh3_model, EmbedOptions(prefix="s2s"), True).prefix == "s2s"


def test_result_does_not_depend_on_batch_composition(ankh3_model):
    seqs = _seqs(16)
    alone = protlm.embed(ankh3_model, seqs, per_residue=True, max_tokens=1)  # every protein alone
    packed = protlm.embed(ankh3_model, seqs, per_residue=True, max_tokens=4096)
    mixed = protlm.embed(ankh3_model, dict(reversed(list(seqs.items()))), per_residue=True, max_tokens=700)
    for k in seqs:
        assert alone[k].shape == (len(seqs[k]), ankh3_model.config.d_model)
        assert np.abs(alone[k] - packed[k]).max() <= 1e-5
        assert np.abs(alone[k] - mixed[k]).max() <= 1e-5


@pytest.mark.parametrize("family,attn", [("ankh3", "sdpa"), ("ankh", "eager"), ("prot-t5", "sdpa")])
def test_matches_transformers_recipe(tmp_path, family, attn):
    """The ProtTrans recipe: transformers' T5EncoderModel on the same weights, slicing the residues out."""
    transformers = pytest.importorskip("transformers")
    ffn = "relu" if family == "prot-t5" else "gated-silu"
    pre = protlm.random_init(odd_config(protlm_family=family, feed_forward_proj=ffn), seed=5, encoder_only=True)
    protlm.save_pretrained(pre.model, tmp_path, pre.tokenizer)
    hf = transformers.T5EncoderModel.from_pretrained(tmp_path, attn_implementation=attn).eval()
    seqs = _seqs(6)
    got = {e.id: e for e in embed_iter(str(tmp_path), seqs, layers=[2, -1], max_tokens=900)}
    loaded = protlm.load(str(tmp_path), encoder_only=True)
    prefix = [loaded.tokenizer.prefix_ids["nlu"]] if family == "ankh3" else []
    for k, s in seqs.items():
        ids = torch.tensor([prefix + loaded.tokenizer.residue_array(s).tolist() + [loaded.tokenizer.eos_id]])
        with torch.no_grad():
            out = hf(input_ids=ids, output_hidden_states=True)
        n = len(prefix)
        last = out.last_hidden_state[0, n:n + len(s)].numpy()
        layer2 = out.hidden_states[2][0, n:n + len(s)].numpy()
        e = got[k]
        assert e.per_residue.shape == (2, len(s), pre.config.d_model)
        assert np.abs(e.per_residue[1] - last).max() <= 1e-5
        assert np.abs(e.per_residue[0] - layer2).max() <= 1e-5
        assert np.abs(e.per_protein[1] - last.mean(0)).max() <= 1e-5


def test_long_protein_is_stitched_from_windows(ankh3_model):
    seq = "".join(_seqs(3).values())[:300]
    window, overlap = 64, 20
    got = protlm.embed(ankh3_model, {"long": seq}, per_residue=True, window=window, overlap=overlap)["long"]
    assert got.shape == (300, ankh3_model.config.d_model)
    for u in split(0, len(seq), window, overlap):
        part = protlm.embed(ankh3_model, {"w": seq[u.start:u.end]}, per_residue=True)["w"]
        np.testing.assert_allclose(got[u.keep_start:u.keep_end], part[u.keep_start - u.start:u.keep_end - u.start],
                                   atol=1e-5)
    whole = protlm.embed(ankh3_model, {"long": seq}, per_residue=True, window=300)["long"]
    assert np.abs(got - whole).max() > 1e-3  # the windows really did something
    assert np.allclose(got[:window - overlap // 2], whole[:window - overlap // 2], atol=1.0)


def test_identical_sequences_are_embedded_once(ankh3_model):
    run = _Run(ankh3_model, EmbedOptions(), True)
    records = [("a", "MKTAYIAKQR"), ("b", "MSEQWENCE"), ("c", "mktayiakqr")]
    arrays, groups = run.tokenize(records)
    assert sorted(len(g) for g in groups.values()) == [1, 2]
    out = {e.id: e.per_protein for e in embed_iter(ankh3_model, records)}
    assert set(out) == {"a", "b", "c"}
    np.testing.assert_array_equal(out["a"], out["c"])


def test_several_layers_have_a_leading_axis(ankh3_model):
    out = {e.id: e for e in embed_iter(ankh3_model, {"a": "MKTAYIAKQR"}, layers=[0, -1, 1])}["a"]
    assert out.per_residue.shape == (3, 10, 40) and out.per_protein.shape == (3, 40)
    with pytest.raises(ConfigError, match="out of range"):
        next(embed_iter(ankh3_model, {"a": "MK"}, layers=[7]))
    assert len(next(embed_iter(ankh3_model, {"a": "MK"}, layers="all")).per_protein) == 4


def test_bf16_weights_stay_close_to_fp32(ankh3_model):
    seqs = _seqs(4)
    ref = protlm.embed(ankh3_model, seqs)
    bf = protlm.embed(ankh3_model, seqs, dtype="bf16")
    for k in seqs:
        cos = ref[k] @ bf[k] / np.linalg.norm(ref[k]) / np.linalg.norm(bf[k])
        assert cos > 0.999
    assert next(ankh3_model.model.parameters()).dtype == torch.float32  # the caller's model is not cast


def test_fp16_overflow_is_detected_and_recomputed():
    pre = protlm.random_init(odd_config(), seed=1, encoder_only=True)
    seqs = {"a": "MKTAYIAKQRQISFVKSHFSRQ", "b": "MSEQ"}
    with torch.no_grad():  # blow up the first FFN so its output exceeds fp16's range (weights stay small)
        ff = pre.model.encoder.block[0].layer[-1].DenseReluDense
        for lin in (ff.wi_0, ff.wi_1, ff.wo):
            lin.weight.mul_(100)
    ref = protlm.embed(pre, seqs, per_residue=True)
    run = _Run(pre, EmbedOptions(dtype="fp16"), True)
    arrays, _ = run.tokenize(list(seqs.items()))
    got = dict(run.embedder.run(arrays))
    assert run.embedder.stats.fp16_fallbacks == 1
    for i, k in enumerate(seqs):
        assert np.abs(got[i][0] - ref[k]).max() < 0.01  # fp16-rounded weights, fp32 arithmetic
    # without the guard the clamped fp16 result is far off
    with torch.inference_mode():
        ids = torch.tensor([pre.tokenizer.encode(seqs["a"], prefix="nlu")])
        raw = run.embedder.encoder(ids).last_hidden_state[0, 1:-1].float().numpy()
    assert np.abs(raw - ref["a"]).max() > 0.1


def test_out_of_memory_splits_the_batch(ankh3_model, monkeypatch):
    seqs = _seqs(8)
    ref = protlm.embed(ankh3_model, seqs, per_residue=True)
    run = _Run(ankh3_model, EmbedOptions(max_tokens=100000), True)
    real = run.embedder._forward

    def fake(units, sequences):
        if len(units) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(units, sequences)

    monkeypatch.setattr(run.embedder, "_forward", fake)
    arrays, _ = run.tokenize(list(seqs.items()))
    got = dict(run.embedder.run(arrays))
    assert run.embedder.stats.oom_splits >= 1
    for i, k in enumerate(seqs):
        assert np.abs(got[i][0] - ref[k]).max() <= 1e-5


def test_bad_sequences_and_options(ankh3_model):
    with pytest.raises(InputError, match="duplicate id 'a'"):
        protlm.embed(ankh3_model, [("a", "MK"), ("a", "MKT")])
    with pytest.raises(InputError, match="record 'b'.*'J'"):
        protlm.embed(ankh3_model, {"a": "MK", "b": "MKJ"})
    with pytest.raises(ConfigError, match="overlap"):
        protlm.embed(ankh3_model, {"a": "MK"}, window=10, overlap=10)
    with pytest.raises(ConfigError, match="preset"):
        protlm.embed("tiny", {"a": "MK"})
    with pytest.raises(ConfigError, match="prefix"):
        protlm.embed(ankh3_model, {"a": "MK"}, prefix="xyz")


def test_protlm_embed_is_callable_after_importing_the_package(ankh3_model):
    import protlm.embedding  # the package is protlm.embedding, so importing it leaves the function protlm.embed alone

    assert protlm.embed(ankh3_model, {"a": "MKT"})["a"].shape == (40,)
