"""Benchmark file readers on vendored excerpts of the real files (tests/data/eval, see tests/data/SOURCES.md),
plus the bad-input errors, each naming the file and the record."""

import os
import shutil

import numpy as np
import pytest

from protlm.errors import ConfigError, InputError
from protlm.evaluate.datasets import (load_dataset, load_flip_csv, load_flip_ss, read_deeploc_csv, read_deeploc_fasta,
                                      read_proteinnet, read_ss_csv, read_tape_fluorescence)
from protlm.evaluate.embeddings import OneHotSource, Prepared, gather_features, one_hot
from protlm.evaluate.structure import parse_dssp, read_pdb_residues, ss8_to_ss3, structure_contacts
from protlm.evaluate.tasks import TaskExample, TaskSpec, holdout, resolve_split

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")


def path(name):
    return os.path.join(EVAL, name)


def ssp3_task(**kw):
    base = dict(name="SSP-3", kind="residue_classification", label="ss3", classes=["H", "E", "C"], train="d/train",
                valid="d/valid", test={"t": "d/test"})
    base.update(kw)
    return TaskSpec(**base)


# --- formats ----------------------------------------------------------------------------------------------------
def test_prottrans_csv_with_spaces_and_disorder_mask():
    recs = read_ss_csv(path("CB513_excerpt.csv"))
    assert len(recs) == 20
    r = recs[0]
    assert r.id == "CB513_excerpt#0" and " " not in r.sequence
    assert len(r.labels["ss3"]) == len(r.labels["ss8"]) == len(r.sequence) == r.mask.size
    assert set("".join(x.labels["ss8"] for x in recs)) <= set("GHIBESTC")
    # the mask is the disorder column: 1.0 = resolved; the excerpt has unresolved residues
    assert sum(int((~x.mask).sum()) for x in recs) > 0
    ex = ssp3_task().encode(r, "cb513")
    assert (ex.target[~r.mask] == -1).all() and (ex.target[r.mask] >= 0).all()


def test_unspaced_csv_with_ids():
    recs = read_ss_csv(path("casp14_ssp_expected.csv"))
    assert [r.id for r in recs] == ["T1031", "T1046s1", "T1064"]
    assert recs[0].mask is None and len(recs[0].labels["ss8"]) == len(recs[0].sequence)


def test_flip_secondary_structure_splits():
    splits = load_flip_ss({"sequences": path("flip_ss3_sequences.fasta"), "labels": path("flip_ss3_labels.fasta"),
                           "mask": path("flip_ss3_mask.fasta")})
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "valid": 10, "test": 10}
    r = splits["train"][0]
    assert r.id == "2a6h-E" and r.mask.size == len(r.sequence) and not r.mask[0] and r.mask[1:50].all() and not r.mask[-1]


def test_flip_gb1_csv():
    splits = load_flip_csv({"path": path("gb1_three_vs_rest_excerpt.csv")})
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "valid": 8, "test": 40}
    lengths = {len(r.sequence) for v in splits.values() for r in v}
    assert lengths == {265}
    assert all(r.id.startswith("seq-") for r in splits["train"])
    assert isinstance(splits["test"][0].labels["fitness"], float)


def test_deeploc_fasta_and_prottrans_csv():
    recs = read_deeploc_fasta(path("deeploc_test_excerpt.fasta"))
    assert len(recs) == 40
    assert {r.labels["membrane"] for r in recs} <= {"M", "S", "U"}
    csv_recs = read_deeploc_csv(path("deeploc_prottrans_excerpt.csv"))
    assert len(csv_recs) == 10 and " " not in csv_recs[0].sequence
    task = TaskSpec(name="Membrane", kind="protein_classification", label="membrane", classes=["M", "S"],
                    exclude_labels=["U"], train="d/train", valid={"holdout": 0.1}, test={"t": "d"})
    encoded = [task.encode(r, "d") for r in recs]
    assert sum(e is None for e in encoded) == sum(r.labels["membrane"] == "U" for r in recs) > 0


def test_tape_fluorescence_fixture():
    # Written by us in TAPE's JSON layout (the real TAPE data is not reachable here).
    recs = read_tape_fluorescence(path("fluorescence_train.json"))
    assert len(recs) == 24 and all(len(r.sequence) == 238 for r in recs)
    assert isinstance(recs[0].labels["fitness"], float)


def test_proteinnet_fixture_matches_the_structure_it_came_from():
    # The fixture holds two CASP14 targets written in ProteinNet's text format (pm, N/CA/C, '-' = missing).
    recs = read_proteinnet(path("proteinnet_fixture.txt"))
    assert [r.id for r in recs] == ["T1046s1_1_A", "T1031_1_A"]
    pn = recs[0].labels["contacts"]
    real = structure_contacts(read_pdb_residues(path("casp14_pdb/T1046s1.pdb.gz")))
    assert pn.shape == real.shape
    # virtual Cβ (ideal geometry) against the deposited Cβ: the 8 Å maps agree almost everywhere
    assert (pn == real).mean() > 0.97
    masked = recs[1]
    assert masked.mask.sum() == masked.mask.size - 5
    assert (masked.labels["contacts"][~masked.mask] == -1).all()


def test_pdb_contacts_use_cb_and_ca_for_glycine():
    residues = read_pdb_residues(path("casp14_pdb/T1031.pdb.gz"))
    assert len(residues) == 95
    gly = next(r for r in residues if r.aa == "G")
    assert gly.contact_atom is gly.ca
    other = next(r for r in residues if r.aa != "G")
    assert other.contact_atom is other.cb
    cmap = structure_contacts(residues)
    assert (cmap == cmap.T).all() and (np.diag(cmap) == 1).all()
    ds = load_dataset("c14", "pdb_contacts", {"all": path("casp14_pdb")})
    assert [r.id for r in ds["all"]] == ["T1031", "T1046s1", "T1064"]


def test_dssp_parsing_breaks_cystines_and_loops():
    text = (
        "  #  RESIDUE AA STRUCTURE BP1 BP2  ACC\n"
        "    1    1 A M              0   0  194\n"
        "    2    2 A a  H           0   0  177\n"
        "    3        !              0   0    0\n"
        "    4    5 A K  P           0   0   52\n"
        "    5    6 A G  E           0   0   52\n"
    )
    chain = parse_dssp(text)
    assert chain.sequence == "MCKG" and chain.ss8 == "CHPE" and chain.chain_breaks == 1
    assert chain.numbers == [1, 2, 5, 6]
    assert ss8_to_ss3("GHIEBTSPC") == "HHHEECCCC"


# --- bad input --------------------------------------------------------------------------------------------------
def test_label_length_differs_from_sequence(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("input, dssp3, dssp8, disorder\nM K V, C H, C H H, 1.0 1.0 1.0\n")
    with pytest.raises(InputError, match=r"bad.csv: record 'bad#0' \(line 2\): dssp3 has 2 entries but the sequence has 3"):
        read_ss_csv(str(bad))


def test_flip_label_length_mismatch_names_file_and_record(tmp_path):
    (tmp_path / "s.fasta").write_text(">a\nMKV\n")
    (tmp_path / "l.fasta").write_text(">a SET=train VALIDATION=False\nCC\n")
    with pytest.raises(InputError, match=r"l.fasta: record 'a' \(line 1\): secondary structure has 2 entries"):
        load_flip_ss({"sequences": str(tmp_path / "s.fasta"), "labels": str(tmp_path / "l.fasta")})


def test_unknown_label_class_names_file_record_and_position(tmp_path):
    bad = tmp_path / "odd.csv"
    bad.write_text("input, dssp3\nM K V, C Q H\n")
    rec = read_ss_csv(str(bad))[0]
    with pytest.raises(InputError, match=r"odd.csv: record 'odd#0' \(line 2\): unknown ss3 class 'Q' at residue 2"):
        ssp3_task().encode(rec, "d")
    loc = TaskSpec(name="Loc", kind="protein_classification", label="location", classes=["Nucleus"], train="d",
                   valid={"holdout": 0.5}, test={"t": "d"})
    rec = read_deeploc_fasta(path("deeploc_test_excerpt.fasta"))[0]
    with pytest.raises(InputError, match=r"deeploc_test_excerpt.fasta: record '.+': unknown location class"):
        [loc.encode(r, "d") for r in read_deeploc_fasta(path("deeploc_test_excerpt.fasta"))]
    assert rec.labels["location"]


def test_missing_split_names_the_files():
    splits = {"flip": load_flip_ss({"sequences": path("flip_ss3_sequences.fasta"), "labels": path("flip_ss3_labels.fasta")})}
    files = {"flip": {"labels": path("flip_ss3_labels.fasta")}}
    with pytest.raises(InputError, match=r"flip_ss3_labels.fasta: no split 'validation' for task 'SSP-3'"):
        resolve_split("flip/validation", splits, "SSP-3", files)
    splits["flip"]["valid"] = []
    with pytest.raises(InputError, match=r"split 'valid' is empty"):
        resolve_split("flip/valid", splits, "SSP-3", files)
    with pytest.raises(ConfigError, match="has splits"):
        resolve_split("flip", splits, "SSP-3", files)


def test_missing_file_names_dataset_and_key(tmp_path):
    with pytest.raises(InputError, match=r"nope.csv: no such file \(dataset 'x', file 'all'\)"):
        load_dataset("x", "ss_csv", {"all": str(tmp_path / "nope.csv")})


def test_invalid_residue_names_record(tmp_path):
    bad = tmp_path / "gb1.csv"
    bad.write_text("sequence,target,set,validation\nMK1V,1.0,train,\n")
    with pytest.raises(InputError, match=r"gb1.csv: line 2: invalid residue '1' at position 3"):
        load_flip_csv({"path": str(bad)})


def test_missing_embeddings_are_counted_before_training():
    recs = read_ss_csv(path("CASP12_excerpt.csv"))
    exs = {"train": [ssp3_task().encode(r, "casp12") for r in recs]}
    arrays = {r.id: one_hot(r.sequence) for r in recs[:1]}  # two of three missing
    stores = {"casp12": Prepared(arrays, "/data/emb/casp12.h5")}
    with pytest.raises(InputError, match=r"/data/emb/casp12.h5: embeddings missing for 2 of 3 proteins of task "
                                         r"'SSP-3' split 'train' \(first: 'CASP12_excerpt#1'\)"):
        gather_features(stores, exs, "SSP-3", allow_missing=False)
    fs, missing, kept = gather_features(stores, exs, "SSP-3", allow_missing=True)
    assert missing == {"train": [2, 3]} and len(kept["train"]) == 1 and fs.dim == 21


def test_embedding_of_the_wrong_length_is_an_error():
    recs = read_ss_csv(path("CASP12_excerpt.csv"))[:1]
    exs = {"train": [ssp3_task().encode(r, "casp12") for r in recs]}
    stores = {"casp12": Prepared({recs[0].id: np.zeros((3, 8), np.float32)}, "e.h5")}
    with pytest.raises(InputError, match=r"e.h5: embedding of 'CASP12_excerpt#0' is 3x8 but the sequence has"):
        gather_features(stores, exs, "SSP-3", allow_missing=False)


def test_one_hot_baseline():
    arr = OneHotSource().prepare("d", read_ss_csv(path("CASP12_excerpt.csv"))).arrays
    first = next(iter(arr.values()))
    assert first.shape[1] == 21 and (first.sum(1) == 1).all()
    assert one_hot("AXU").argmax(1).tolist() == [0, 20, 20]


def test_holdout_is_fixed_and_disjoint():
    exs = [TaskExample(str(i), "d", 5, 0) for i in range(50)]
    tr1, va1 = holdout(exs, 0.1)
    tr2, va2 = holdout(exs, 0.1)
    assert [e.id for e in va1] == [e.id for e in va2] and len(va1) == 5 and len(tr1) == 45
    assert not {e.id for e in tr1} & {e.id for e in va1}
