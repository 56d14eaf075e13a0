"""ESM-2 through the workflows: embed (rows, windows, resume, precisions), info, project and evaluate, on a tiny
random ESM saved with save_pretrained (the Hugging Face file layout a published checkpoint has)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
import yaml

import protlm
from protlm.cli.main import main
from protlm.config import EsmConfig
from protlm.embedding import embed_files
from protlm.embedding.batching import split
from protlm.embedding.store import EmbeddingStore
from protlm.errors import ConfigError
from protlm.evaluate import ModelSource
from tests.test_evaluate_runner import SUITE

pytestmark = pytest.mark.usefixtures("one_thread")

# Odd widths catch shape bugs; 68 positions make max_residues 64 (1026 -> 1022 for ESM-2), so that the vendored
# proteins go through the model's own default window.
TINY = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
            max_position_embeddings=68)
LIMIT = 64
SEQS = {"short": "MKTAYIAKQRQISFVKSHFSRQ", "tiny": "MKV", "odd": "MSEQXUBZOK", "long": "ACDEFGHIKLMNPQRSTVWY" * 8}


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory):
    pre = protlm.load(EsmConfig(**TINY), random_init=True, seed=1)
    path = str(tmp_path_factory.mktemp("esm") / "esm-tiny")
    protlm.save_pretrained(pre.model, path, pre.tokenizer)
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(path))
    return path


def _fasta(path, seqs=SEQS) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(f">{k}\n{v}\n" for k, v in seqs.items())
    return str(path)


def _encode(pre, seq: str, layers) -> dict[int, np.ndarray]:
    """The reference: the whole `<cls> residues <eos>` row through model.encode, specials dropped."""
    ids = torch.tensor([pre.tokenizer.encode(seq)])
    assert ids[0, 0] == pre.tokenizer.bos_id and ids[0, -1] == pre.tokenizer.eos_id
    with torch.no_grad():
        out = pre.model.encode(ids, torch.ones_like(ids), output_layers=layers).hidden_states
    return {l: h[0, 1:-1].numpy() for l, h in out.items()}


def test_embed_gives_one_row_per_residue_equal_to_encode(esm_dir, tmp_path, capsys):
    fasta = _fasta(tmp_path / "in.fasta", {k: v for k, v in SEQS.items() if k != "long"})
    res, prot = str(tmp_path / "r.h5"), str(tmp_path / "p.h5")
    assert main(["embed", esm_dir, fasta, "--per-residue", res, "--per-protein", prot, "--layers", "0", "2", "-1",
                 "--dtype", "fp32", "--no-progress"]) == 0
    pre = protlm.load(esm_dir)
    with EmbeddingStore(res) as store:
        assert (store.attrs["family"], store.attrs["model_type"], store.attrs["prefix"]) == ("esm2", "esm", "none")
        assert store.attrs["window"] == LIMIT and store.attrs["overlap"] == LIMIT // 4
        for oid, seq in SEQS.items():
            if oid == "long":
                continue
            assert store.layers == [0, 2, 3]
            ref = _encode(pre, seq, [0, 2, 3])
            for l in store.layers:
                with EmbeddingStore(res, layer=l) as one:
                    got = np.asarray(one[oid])
                assert got.shape == (len(seq), 36)  # exactly one row per residue: <cls> and <eos> dropped
                np.testing.assert_allclose(got, ref[l], atol=1e-5, rtol=1e-5)
    with EmbeddingStore(prot) as store:
        np.testing.assert_allclose(np.asarray(store["short"]), _encode(pre, SEQS["short"], [-1])[3].mean(0),
                                   atol=1e-5)
    # protlm project reads an ESM file like any other
    assert main(["project", prot, "--method", "pca", "-o", str(tmp_path / "map.png")]) == 0
    assert os.path.getsize(tmp_path / "map.png") > 0


def test_long_protein_is_windowed_at_the_model_limit_and_resumes(esm_dir, tmp_path):
    pre = protlm.load(esm_dir)
    first = {k: SEQS[k] for k in ("short", "long")}
    out = str(tmp_path / "r.h5")
    s = embed_files(pre, first, per_residue=out, progress=False, dtype="fp32")
    assert (s.embedded, s.windowed) == (2, 1)  # 160 residues > the default window, ESM's 64
    # stitched from windows of at most 64 residues, each `<cls> window <eos>`, as the batching rule says
    seq = SEQS["long"]
    ref = np.empty((len(seq), 36), np.float32)
    units = split(0, len(seq), LIMIT, LIMIT // 4)
    assert len(units) > 2
    for u in units:
        ref[u.keep_start:u.keep_end] = _encode(pre, seq[u.start:u.end], [-1])[3][u.keep_start - u.start:u.keep_end - u.start]
    with EmbeddingStore(out) as store:
        got = np.asarray(store["long"])
        before = np.asarray(store["short"])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(got - _encode(pre, seq[:LIMIT], [-1])[3][0]).max() > 0  # not a copy of one window
    # a second run with one more protein embeds only that one and leaves the stored ones alone
    s = embed_files(pre, {**first, "tiny": SEQS["tiny"]}, per_residue=out, progress=False, dtype="fp32")
    assert (s.already_done, s.embedded) == (2, 1)
    with EmbeddingStore(out) as store:
        assert sorted(store.ids()) == ["long", "short", "tiny"]
        np.testing.assert_array_equal(np.asarray(store["short"]), before)
    # a smaller window is allowed and changes the cut
    small = protlm.embed(pre, {"long": seq}, per_residue=True, window=40, overlap=10, dtype="fp32")["long"]
    assert small.shape == (len(seq), 36) and np.abs(small - got).max() > 1e-4


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_window_above_the_limit_and_task_prefixes_are_one_line_errors(esm_dir, tmp_path, capsys):
    fasta = _fasta(tmp_path / "in.fasta", {"short": SEQS["short"]})
    args = ["embed", esm_dir, fasta, "--per-protein", str(tmp_path / "p.h5"), "--no-progress"]
    assert main(args + ["--window", str(LIMIT + 1)]) == 2
    err = _one_line_error(capsys)
    assert f"--window {LIMIT + 1} is longer than this model's limit of {LIMIT} residues" in err
    assert main(args + ["--prefix", "nlu"]) == 2
    err = _one_line_error(capsys)
    assert "--prefix nlu" in err and "no task tokens" in err and "esm2" in err
    assert not os.path.exists(tmp_path / "p.h5")
    # the same model with --window at the limit and an explicit --prefix none runs
    assert main(args + ["--window", str(LIMIT), "--prefix", "none"]) == 0


def test_random_init_preset_in_fp16_and_int8(tmp_path):
    """esm2_t6_8M --random-init embeds; the fp16 overflow watch (on encoder.block) and the int8 path run on ESM
    and stay close to fp32."""
    seqs = {"a": SEQS["short"], "b": SEQS["odd"]}
    pre = protlm.load("esm2_t6_8M", random_init=True)
    assert pre.model.max_residues == 1022
    ref = protlm.embed(pre, seqs, per_residue=True, dtype="fp32")
    assert ref["a"].shape == (len(seqs["a"]), 320)
    for dtype, tol in (("fp16", 0.02), ("int8", 0.15)):
        got = protlm.embed(pre, seqs, per_residue=True, dtype=dtype)
        for k in seqs:
            assert got[k].shape == ref[k].shape
            rel = np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])
            assert rel < tol, (dtype, k, rel)
    s = embed_files("esm2_t6_8M", seqs, per_protein=str(tmp_path / "p.h5"), random_init=True,
                           progress=False, dtype="fp32")
    assert s.embedded == 2
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        assert fh.attrs["model"] == "random-init esm2_t6_8M seed=0" and fh.attrs["window"] == 1022


def test_t5_keeps_its_window_and_prefix(tmp_path, tiny_config):
    pre = protlm.random_init(tiny_config, seed=0, encoder_only=True)
    s = embed_files(pre, {"a": "MKV" * 30}, per_protein=str(tmp_path / "p.h5"), progress=False, dtype="fp32")
    assert s.windowed == 0
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        assert (fh.attrs["window"], fh.attrs["prefix"], fh.attrs["model_type"]) == (4000, "nlu", "t5")


def test_info_prints_each_familys_fields(esm_dir, capsys):
    assert main(["info", esm_dir]) == 0
    out = capsys.readouterr().out
    assert "family        esm2 (masked-lm)" in out
    assert "hidden=36 ffn=37 heads=3x12 layers=3 positions=rotary" in out
    assert f"up to {LIMIT} residues" in out and "33 tokens from" in out and "no task tokens" in out
    assert "d_ff" not in out and "sentinels" not in out
    assert main(["info", "debug"]) == 0
    out = capsys.readouterr().out
    assert "d_model=64" in out and "sentinels" in out and "(encoder-decoder)" in out


def test_evaluate_puts_esm_beside_a_t5_model(esm_dir, tmp_path, capsys):
    suite = tmp_path / "mini.yaml"
    suite.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    out = str(tmp_path / "out")
    # --prefix nlu --prefix s2s: two columns for the T5 model, one for ESM (it has no task tokens)
    assert main(["evaluate", "--suite", str(suite), "--model", esm_dir, "--random-init", "debug", "--tasks", "GB1",
                 "--quick", "--set", "seeds=[7]", "--threads", "1", "--no-progress", "--out", out,
                 "--cache-dir", str(tmp_path / "cache"), "--prefix", "nlu", "--prefix", "s2s"]) == 0
    printed = capsys.readouterr().out
    assert "has no task tokens; one column without a prefix" in printed
    with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
        names = [s["name"] for s in json.load(fh)["sources"]]
    assert names == ["one-hot", "debug (random init) [NLU]", "debug (random init) [S2S]", "esm-tiny (random init)",
                     "esm-tiny"]
    assert "| GB1 | FLIP | Spearman |" in printed and "esm-tiny" in printed
    # the cache keeps the checkpoint, its twin and the T5 model apart; the ESM files are ESM-2 arrays
    cache = sorted(os.listdir(tmp_path / "cache"))
    assert len(cache) == 4, cache
    esm_files = [os.path.join(tmp_path / "cache", d, "gb1.layer-1.auto.h5") for d in cache if d.startswith("esm-tiny")]
    with EmbeddingStore(esm_files[0]) as store:
        assert store.attrs["family"] == "esm2" and store.attrs["window"] == LIMIT
        assert np.asarray(store[next(iter(store.ids()))]).shape[1] == 36


def test_model_source_refuses_a_task_token_for_esm(esm_dir, tmp_path):
    with pytest.raises(ConfigError, match="esm-tiny is an ESM-style model, whose vocabulary has no task tokens"):
        ModelSource(esm_dir, prefix="nlu", cache_dir=str(tmp_path))
    # the random-init twins of an ESM and a T5 preset never share a cache key
    keys = {ModelSource(s, random_init_of=s, cache_dir=str(tmp_path)).key for s in ("esm2_t6_8M", "debug", esm_dir)}
    assert len(keys) == 3
