"""Annotation transfer (protlm transfer) and embeddings files that protspace and biotrainer read."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import protlm
from protlm.cli.main import main
from protlm.data.fasta import read_fasta
from protlm.embedding import EmbeddingStore, EmbeddingWriter, embed_files
from protlm.embedding.transfer import nearest_labels, similarity, transfer_annotations
from protlm.errors import InputError
from tests.conftest import DATA, odd_config

ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")


def _write(path, arrays: dict[str, np.ndarray], **attrs) -> str:
    """A per-protein file written by protlm's own writer, with the given file attributes."""
    base = dict(model="m", layers=[2], prefix="nlu", dtype="fp32", kind="per_protein", window=4000, overlap=0,
                store_dtype="float32")
    w = EmbeddingWriter(path, {**base, **attrs})
    w.start()
    for oid, arr in arrays.items():
        w.add(oid, oid.replace(".", "_"), arr, "sha")
    w.flush()
    w.merge()
    w.close(remove_parts=True)
    return str(path)


def _clusters(seed=0, n=30, d=8):
    """Three well separated clusters; ids say which cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 10
    ids, xs = [], []
    for i in range(n):
        c = i % 3
        ids.append(f"c{c}_{i}")
        xs.append(centres[c] + rng.normal(size=d) * 0.1)
    return ids, np.stack(xs).astype(np.float32)


def test_one_nn_matches_a_brute_force_search():
    ids, x = _clusters()
    ref_ids, ref_x, q_ids, q_x = ids[:20], x[:20], ids[20:], x[20:]
    labels = [r.split("_")[0] for r in ref_ids]
    for metric in ("euclidean", "cosine"):
        got = nearest_labels(ref_ids, ref_x, labels, q_ids, q_x, k=1, metric=metric)
        for t, q in zip(got, q_x):
            if metric == "euclidean":
                d = np.linalg.norm(ref_x - q, axis=1)
            else:
                d = 1 - ref_x @ q / (np.linalg.norm(ref_x, axis=1) * np.linalg.norm(q))
            j = int(np.argmin(d))
            assert t.hits[0].reference == ref_ids[j]
            assert t.hits[0].distance == pytest.approx(d[j], rel=1e-4, abs=1e-5)
            assert t.label == t.query.split("_")[0]  # clusters are far apart: 1-NN is always right


def test_reliability_is_gopredsim_summed_similarity_over_k():
    # query at 0; references on a line: B at 0.1, A at 0.2 and 0.3
    ref_x = np.array([[0.1], [0.2], [0.3]])
    one = nearest_labels(["b", "a1", "a2"], ref_x, ["B", "A", "A"], ["q"], np.zeros((1, 1)), k=1)[0]
    assert one.label == "B" and one.reliability == pytest.approx(0.5 / 0.6)
    three = nearest_labels(["b", "a1", "a2"], ref_x, ["B", "A", "A"], ["q"], np.zeros((1, 1)), k=3)[0]
    assert [h.reference for h in three.hits] == ["b", "a1", "a2"]
    assert three.label == "A" and three.reliability == pytest.approx((0.5 / 0.7 + 0.5 / 0.8) / 3)
    assert similarity(np.array([0.0, 0.5]), "euclidean").tolist() == [1.0, 0.5]
    assert similarity(np.array([0.25, 1.5]), "cosine").tolist() == [0.75, 0.0]


def test_exclude_self_skips_the_query_own_id():
    ids, x = _clusters()
    labels = [r.split("_")[0] for r in ids]
    same = nearest_labels(ids, x, labels, ids[:3], x[:3], k=1)
    assert [t.hits[0].reference for t in same] == ids[:3]
    loo = nearest_labels(ids, x, labels, ids[:3], x[:3], k=1, exclude_self=True)
    assert all(t.hits[0].reference != t.query and t.label == t.query.split("_")[0] for t in loo)


def test_cli_writes_the_table(tmp_path):
    ids, x = _clusters()
    ref = _write(tmp_path / "ref.h5", dict(zip(ids[:20], x[:20])))
    query = _write(tmp_path / "q.h5", dict(zip(ids[20:], x[20:])))
    (tmp_path / "labels.tsv").write_text("id\tlabel\n" + "".join(f"{r}\t{r.split('_')[0]}\n" for r in ids[:20]))
    out = tmp_path / "t.tsv"
    assert main(["transfer", "--reference", ref, "--labels", str(tmp_path / "labels.tsv"), "--query", query,
                 "-k", "2", "-o", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["query", "rank", "reference", "reference_label", "distance", "similarity", "label",
                       "reliability"]
    assert len(rows) == 1 + 2 * 10
    for r in rows[1:]:
        assert r[6] == r[0].split("_")[0] and r[3] == r[2].split("_")[0]
        assert float(r[5]) == pytest.approx(0.5 / (0.5 + float(r[4])), abs=1e-4)


def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    ids, x = _clusters()
    ref = _write(tmp_path / "ref.h5", dict(zip(ids[:20], x[:20])), model="org/model-a")
    lab = tmp_path / "labels.csv"
    lab.write_text("id,label\n" + "".join(f"{r},{r[:2]}\n" for r in ids[1:20]))  # ids[0] unlabelled
    other = _write(tmp_path / "other.h5", dict(zip(ids[20:], x[20:])), model="org/model-b")
    same = _write(tmp_path / "same.h5", dict(zip(ids[20:], x[20:])), model="org/model-a")
    wide = _write(tmp_path / "wide.h5", {i: np.zeros(9, np.float32) for i in ids[20:]}, model="org/model-a")
    base = ["transfer", "--reference", ref, "--labels", str(lab), "-o", str(tmp_path / "t.tsv")]

    err = _err(capsys, base + ["--query", same])
    assert "ref.h5" in err and repr(ids[0]) in err and "--allow-missing" in err
    assert main(base + ["--query", same, "--allow-missing"]) == 0
    assert ids[0] not in (tmp_path / "t.tsv").read_text()
    err = _err(capsys, base + ["--query", other, "--allow-missing"])
    assert "org/model-a" in err and "org/model-b" in err and "other.h5" in err
    err = _err(capsys, base + ["--query", wide, "--allow-missing"])
    assert "9 wide" in err and "8" in err
    with pytest.raises(InputError, match="per-residue"):
        res = _write(tmp_path / "res.h5", {"a": np.zeros((5, 8), np.float32)}, kind="per_residue", model="org/model-a")
        transfer_annotations(ref, {}, res)


# --- files other tools read ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Per-protein and per-residue files of 6 E. coli proteins from protlm embed (one layer, as protspace wants)."""
    pre = protlm.random_init(odd_config(), seed=3, encoder_only=True)
    seqs = {r.id: r.sequence for r in list(read_fasta(ECOLI))[:6]}
    d = tmp_path_factory.mktemp("emb")
    embed_files(pre, seqs, per_residue=d / "r.h5", per_protein=d / "p.h5", progress=False)
    return seqs, str(d / "p.h5"), str(d / "r.h5")


def test_h5_layout_for_protspace_and_biotrainer(embedded):
    seqs, prot, res = embedded
    for path, kind in ((prot, "per_protein"), (res, "per_residue")):
        with h5py.File(path, "r") as fh:
            assert fh.attrs["kind"] == kind
            assert fh.attrs["model_name"] == fh.attrs["model"] and fh.attrs["model_name"]  # protspace's name
            assert sorted(fh.keys()) == sorted(seqs)  # these ids are HDF5-safe: keys are the ids (protspace)
            for key, ds in fh.items():
                assert ds.attrs["original_id"] == key  # biotrainer's id attribute, bio_embeddings' too
                assert ds.shape == ((40,) if kind == "per_protein" else (len(seqs[key]), 40))


def test_protspace_reads_a_protlm_file(embedded):
    h5 = pytest.importorskip("protspace.data.loaders.h5")
    seqs, prot, _ = embedded
    emb = h5.load_h5([__import__("pathlib").Path(prot)])
    with EmbeddingStore(prot) as store:
        assert emb.name == store.attrs["model"]
        assert sorted(h5.parse_identifier(h) for h in emb.headers) == sorted(
            h5.parse_identifier(i) for i in seqs)
        for header, row in zip(emb.headers, emb.data):
            np.testing.assert_array_equal(row, store[header])


def test_biotrainer_reads_a_protlm_file(embedded):
    svc = pytest.importorskip("biotrainer.embedders.services.embedding_service")
    seqs, prot, res = embedded
    for path in (prot, res):
        got = svc.EmbeddingService.load_embeddings(path)
        with h5py.File(path, "r") as fh:
            by_id = {fh[k].attrs["original_id"]: v for k, v in got.items()}
        with EmbeddingStore(path) as store:
            assert sorted(by_id) == sorted(seqs)
            for oid, t in by_id.items():
                np.testing.assert_allclose(t.numpy(), store[oid])
