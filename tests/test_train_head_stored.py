"""Heads on embeddings the user already has: ``protlm train-head --embeddings FILE.h5``, and biotrainer's embedding
files (datasets named by a hash of the sequence, the FASTA id in ``original_id``) wherever protlm reads stored
embeddings (the store, train-head, predict, evaluate's DirectorySource)."""

import hashlib
import json
import os

import h5py
import numpy as np
import pytest

from protlm.cli.main import main
from protlm.embedding.store import EmbeddingStore, biotrainer_hash
from protlm.evaluate.bundle import read_meta
from protlm.evaluate.datasets import LabelledRecord, read_deeploc_fasta
from protlm.evaluate.embeddings import DirectorySource

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")
QUICK = ["--set", "training.epochs=2", "--set", "training.warmup_steps=2", "--set", "training.grad_accum=4",
         "--set", "training.precision=fp32", "--no-progress", "--threads", "1"]
SPLIT = ["--split", "0.6,0.2,0.2", "--seed", "3", "--head", "light", "--kind", "regression"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n=30):
    recs = read_deeploc_fasta(os.path.join(EVAL, "deeploc_val_excerpt.fasta"))[:n]
    return [(r.id, r.sequence, f"{len(r.sequence) / 100 + (i % 3):.3f}") for i, r in enumerate(recs)]


def _files(tmp_path, rows):
    labels = tmp_path / "mine.csv"
    labels.write_text("id,sequence,label\n" + "".join(f"{i},{s},{y}\n" for i, s, y in rows))
    fasta = tmp_path / "mine.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s, _ in rows))
    return str(labels), str(fasta)


def _biotrainer_copy(src: str, dst: str, with_ids: set[str]) -> None:
    """``src``'s arrays in biotrainer 1.x's layout: a dataset per sequence named by its hash, gzip-compressed, the
    FASTA id in ``original_id`` only for ``with_ids`` (the others are found by their sequence alone), no file
    attributes."""
    with EmbeddingStore(src) as store, h5py.File(dst, "w") as out:
        for oid, seq in _seqs.items():
            ds = out.create_dataset(biotrainer_hash(seq), data=store[oid], compression="gzip", chunks=True)
            if oid in with_ids:
                ds.attrs["original_id"] = oid


_seqs: dict[str, str] = {}


def _results(out):
    res = json.load(open(os.path.join(out, "results.json")))
    return res, res["results"][0]["values"][0]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Labels of 30 real proteins and their per-residue embeddings by a random-init model (``protlm embed``)."""
    root = tmp_path_factory.mktemp("stored")
    rows = _rows()
    _seqs.update({i: s for i, s, _ in rows})
    labels, fasta = _files(root, rows)
    emb = str(root / "r.h5")
    assert main(["embed", "debug", "--random-init", fasta, "--per-residue", emb, "--dtype", "fp32",
                 "--no-progress", "--threads", "1"]) == 0
    return root, labels, fasta, emb


def test_biotrainer_hash_and_store_lookup(tmp_path):
    # biotrainer 1.x: SHA-256 of "<sequence>_<length>"
    assert biotrainer_hash("MKV") == hashlib.sha256(b"MKV_3").hexdigest()
    path = str(tmp_path / "bio.h5")
    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((2, 2), np.float32)
    with h5py.File(path, "w") as fh:
        fh.create_dataset(biotrainer_hash("MKV"), data=a).attrs["original_id"] = "P1"
        fh.create_dataset(biotrainer_hash("MA"), data=b)  # no original_id
    plain = EmbeddingStore(path)
    assert sorted(plain.ids()) == sorted(["P1", biotrainer_hash("MA")]) and "P2" not in plain
    store = EmbeddingStore(path, sequences={"P1": "MKV", "P2": "MA", "P3": "MKV", "P4": "MKK"})
    assert np.array_equal(store["P1"], a) and np.array_equal(store["P2"], b)
    assert np.array_equal(store["P3"], a)  # another id of the same sequence: biotrainer's one dataset
    assert "P4" not in store and sorted(store.ids()) == sorted(plain.ids())
    # evaluate's DirectorySource reads a single file (train-head) with the same lookups
    recs = [LabelledRecord("P2", "MA", {}), LabelledRecord("P3", "MKV", {})]
    prepared = DirectorySource(path).prepare("anything", recs)
    assert prepared.path == path and np.array_equal(prepared.arrays["P2"], b) and "P4" not in prepared.arrays


@pytest.mark.slow
def test_train_head_on_stored_embeddings_matches_the_model_run(embedded, tmp_path, capsys):
    root, labels, fasta, emb = embedded
    # the same head from MODEL (embedded into evaluate's cache) and from the file protlm embed wrote
    assert main(["train-head", "debug", "--random-init", labels, "-o", str(tmp_path / "m"), "--embed-dtype", "fp32",
                 "--cache-dir", str(tmp_path / "c"), *SPLIT, *QUICK]) == 0
    assert main(["train-head", "--embeddings", emb, labels, "-o", str(tmp_path / "s"), *SPLIT, *QUICK]) == 0
    res_m, value_m = _results(str(tmp_path / "m"))
    res_s, value_s = _results(str(tmp_path / "s"))
    assert res_s["proteins"] == res_m["proteins"] == {"train": 18, "valid": 6, "test": 6}
    assert abs(value_s - value_m) < 1e-6 and res_s["source"]["file"] == emb
    meta = read_meta(os.path.join(str(tmp_path / "s"), "heads", "mine"))
    with h5py.File(emb) as fh:
        layers = [int(x) for x in np.atleast_1d(fh.attrs["layers"])]
        assert meta.backbone["model"] == fh.attrs["model"] == "random-init debug seed=0"
        assert meta.backbone["embed_dtype"] == "fp32" and meta.prefix == fh.attrs["prefix"]
    assert meta.layer == layers[-1] == read_meta(os.path.join(str(tmp_path / "m"), "heads", "mine")).layer

    # the head applies to the file and to the model it names (its identity read from the file's attributes)
    p1, p2 = str(tmp_path / "p1.tsv"), str(tmp_path / "p2.tsv")
    bundle = os.path.join(str(tmp_path / "s"), "heads", "mine")
    assert main(["predict", "--embeddings", emb, "--heads", bundle, fasta, "-o", p1]) == 0
    assert main(["predict", "debug", "--random-init", "--dtype", "fp32", "--heads", bundle, fasta, "-o", p2]) == 0
    a, b = [[line.split("\t") for line in open(p).read().splitlines()[1:]] for p in (p1, p2)]
    assert [r[0] for r in a] == [r[0] for r in b] == list(_seqs)
    assert np.allclose([float(r[2]) for r in a], [float(r[2]) for r in b], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["predict", "tiny", "--random-init", "--heads", bundle, fasta, "-o", p2]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained on debug (random init, seed 0)" in err and "but MODEL is tiny (random init, seed 0)" in err


def test_train_head_embeddings_bad_input_is_one_line(embedded, tmp_path, capsys):
    root, labels, fasta, emb = embedded
    capsys.readouterr()
    assert main(["train-head", "--embeddings", emb, labels, "-o", str(tmp_path / "o"), "--finetune", "lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be fine-tuned" in err and emb in err
    assert main(["train-head", "debug", "--embeddings", emb, labels, "-o", str(tmp_path / "o")]) == 2
    assert "--embeddings replaces MODEL" in capsys.readouterr().err
    assert main(["train-head", "--embeddings", emb, labels, "-o", str(tmp_path / "o"), "--random-init"]) == 2
    assert "--random-init applies to embedding with MODEL" in capsys.readouterr().err
    assert main(["train-head", labels, "-o", str(tmp_path / "o")]) == 2
    assert "give MODEL" in capsys.readouterr().err

    # a labelled protein the file lacks: the file and the first missing id, or --allow-missing
    more = tmp_path / "more.csv"
    more.write_text(open(labels).read() + "not_embedded,MKVLAAGIV,1.0\n")
    out = str(tmp_path / "o")
    assert main(["train-head", "--embeddings", emb, str(more), "-o", out, *SPLIT, *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"protlm train-head: error: {emb}: embeddings missing for 1 of ")
    assert "(first: 'not_embedded')" in err and "--allow-missing" in err
    assert main(["train-head", "--embeddings", emb, str(more), "-o", out, "--allow-missing", *SPLIT, *QUICK]) == 0
    res, _ = _results(out)
    assert sum(n for n, _ in res["missing_embeddings"].values()) == 1


@pytest.mark.slow
def test_biotrainer_file_trains_and_predicts_like_protlm_file(embedded, tmp_path):
    """A biotrainer 1.x file of the same arrays (hash keys; half the datasets without original_id) gives the same
    head and the same predictions as protlm's own file."""
    root, labels, fasta, emb = embedded
    bio = str(tmp_path / "embeddings_file_debug.h5")
    _biotrainer_copy(emb, bio, with_ids=set(list(_seqs)[::2]))
    assert main(["train-head", "--embeddings", emb, labels, "-o", str(tmp_path / "p"), *SPLIT, *QUICK]) == 0
    assert main(["train-head", "--embeddings", bio, labels, "-o", str(tmp_path / "b"), *SPLIT, *QUICK]) == 0
    assert _results(str(tmp_path / "b"))[1] == _results(str(tmp_path / "p"))[1]
    meta = read_meta(os.path.join(str(tmp_path / "b"), "heads", "mine"))
    assert meta.backbone.get("model") is None  # biotrainer's file names no model

    bundle = os.path.join(str(tmp_path / "p"), "heads", "mine")
    t1, t2 = str(tmp_path / "1.tsv"), str(tmp_path / "2.tsv")
    assert main(["predict", "--embeddings", emb, "--heads", bundle, fasta, "-o", t1]) == 0
    assert main(["predict", "--embeddings", bio, "--heads", bundle, fasta, "-o", t2]) == 0
    assert open(t1).read() == open(t2).read()
