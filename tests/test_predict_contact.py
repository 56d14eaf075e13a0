"""Contact heads as tools: ``protlm evaluate`` keeps their bundles (standard protocol), ``protlm predict`` applies
them (top-L pairs in the TSV, the (L, L) probability map under ``--h5``) and reproduces the evaluation's P@L."""

import os

import h5py
import numpy as np
import pytest
import torch
import yaml

import protlm
from protlm.cli.main import main
from protlm.evaluate import ModelSource, OneHotSource, load_suite, run_suite
from protlm.evaluate.bundle import load_bundle
from protlm.evaluate.datasets import load_dataset
from protlm.evaluate.metrics import contact_metrics
from protlm.evaluate.predict import top_contacts
from protlm.evaluate.runner import build_task_data

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")
MODEL = "debug"
SUITE = {
    "name": "mini-contacts",
    "data_root": EVAL,
    "seeds": [0],
    "training": {"epochs": 2, "warmup_steps": 2, "grad_accum": 1, "precision": "fp32"},
    "head": {"pair_dim": 8},
    "datasets": {
        "proteinnet": {"format": "proteinnet", "files": {"train": "proteinnet_fixture.txt",
                                                         "valid": "proteinnet_fixture.txt",
                                                         "test": "proteinnet_fixture.txt"}},
        "casp14_contacts": {"format": "pdb_contacts", "files": {"all": "casp14_pdb"}},
    },
    "tasks": [
        {"name": "CP", "kind": "contact", "label": "contacts", "train": "proteinnet/train", "valid": "proteinnet/valid",
         "test": {"ProteinNet": "proteinnet/test"}, "metrics": ["P@L", "P@L/5", "P@L-long"]},
        {"name": "CP-PDB", "kind": "contact", "label": "contacts", "train": "casp14_contacts",
         "valid": {"holdout": 0.34}, "test": {"CASP14": "casp14_contacts"}, "metrics": ["P@L", "P@L/5"]},
        {"name": "CP-LOO", "kind": "contact", "label": "contacts", "protocol": "leave_one_out",
         "data": "casp14_contacts", "loo_valid": 1, "test_name": "CASP14", "metrics": ["P@L"]},
    ],
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("contacts")
    suite_file = root / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = ModelSource(MODEL, random_init_of=MODEL, cache_dir=str(root / "cache"), dtype="fp32", threads=1)
        run_suite(load_suite(str(suite_file)), [OneHotSource(), src], str(root / "out"), progress=False,
                  log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    return str(root / "out"), str(suite_file), src.key


def _tests(suite_file, name):
    suite = load_suite(suite_file)
    task = suite.task(name)
    loaded = {ds: load_dataset(ds, suite.datasets[ds].format, suite.datasets[ds].files) for ds in task.datasets()}
    data = build_task_data(suite, task, loaded, quick=False)
    return task, data.folds[0].tests, data.records


def test_top_contacts_order_separation_and_ties():
    p = np.zeros((10, 10), np.float32)
    p[0, 9] = p[9, 0] = 0.9
    p[1, 3] = p[3, 1] = 0.99  # too close in sequence (separation 2)
    p[2, 8] = p[8, 2] = 0.5
    p[1, 7] = p[7, 1] = 0.5  # tied with (3, 9): sequence order first
    top = top_contacts(p)
    assert len(top) == 10 and top[:3] == [(1, 10, pytest.approx(0.9)), (2, 8, 0.5), (3, 9, 0.5)]
    assert all(j - i >= 6 for i, j, _ in top)
    assert top_contacts(p, k=1, min_separation=1) == [(2, 4, pytest.approx(0.99))]
    assert top_contacts(np.zeros((4, 4), np.float32)) == []  # no pair 6 apart


@pytest.mark.slow
def test_evaluate_keeps_contact_bundles_and_predict_reproduces_them(evaluated):
    out, suite_file, key = evaluated
    for source in ("one-hot", key):
        for name in ("CP", "CP-PDB"):
            b = load_bundle(os.path.join(out, "heads", source, name))
            assert b.meta.kind == "contact" and b.meta.classes is None and b.meta.head_config["pair_dim"] == 8
        assert not os.path.exists(os.path.join(out, "heads", source, "CP-LOO"))  # leave-one-out keeps none
    pre = protlm.load(MODEL, random_init=True, encoder_only=True)
    for name in ("CP", "CP-PDB"):
        task, tests, records = _tests(suite_file, name)
        for source, model in (("one-hot", None), (key, pre)):
            bundle = os.path.join(out, "heads", source, name)
            meta = load_bundle(bundle).meta
            for test, exs in tests.items():
                got = protlm.predict(model, [bundle], [(e.id, records[(e.dataset, e.id)].sequence) for e in exs])
                maps = [got[e.id][name].probabilities for e in exs]
                assert all(m.shape == (e.length, e.length) and np.allclose(m, m.T) for m, e in zip(maps, exs))
                found = contact_metrics(maps, [e.target for e in exs], [e.positions for e in exs])
                # exactly: same embeddings, same head code path, same probabilities as the scoring
                for metric in task.metrics:
                    assert found[metric] == pytest.approx(meta.metrics[test][metric], abs=0, nan_ok=True), \
                        (name, source, test, metric)


@pytest.mark.slow
def test_cli_writes_top_pairs_and_maps(evaluated, tmp_path):
    out, suite_file, key = evaluated
    task, tests, records = _tests(suite_file, "CP-PDB")
    seqs = [(e.id, records[(e.dataset, e.id)].sequence) for e in tests["CASP14"]]
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in seqs))
    cp, cp_net = os.path.join(out, "heads", key, "CP-PDB"), os.path.join(out, "heads", key, "CP")
    tsv, h5 = str(tmp_path / "p.tsv"), str(tmp_path / "p.h5")
    assert main(["predict", MODEL, "--random-init", "--heads", cp, cp_net, str(fasta), "-o", tsv, "--h5", h5]) == 0
    lines = open(tsv).read().splitlines()
    assert lines[0].split("\t") == ["id", "length", "CP-PDB", "CP"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [i for i, _ in seqs]
    with h5py.File(h5) as fh:
        assert fh["CP-PDB"].attrs["kind"] == "contact"
        for (oid, seq), row in zip(seqs, rows):
            probs = fh["CP-PDB"][oid][()]
            assert probs.shape == (len(seq), len(seq)) and probs.dtype == np.float32
            pairs = [tuple(t.split(",")) for t in row[2].split(";")]
            assert len(pairs) == len(seq)  # top-L
            i, j = np.array([int(t[0]) for t in pairs]), np.array([int(t[1]) for t in pairs])
            p = np.array([float(t[2]) for t in pairs])
            assert np.all(j - i >= 6) and np.all(i >= 1) and np.all(j <= len(seq))
            assert np.allclose(p, probs[i - 1, j - 1], atol=6e-4) and np.all(np.diff(p) <= 1e-3)
            # no pair outside the list is more likely than the last one listed
            mask = np.triu(np.ones_like(probs, dtype=bool), k=6)
            mask[i - 1, j - 1] = False
            assert probs[mask].max(initial=0) <= probs[i[-1] - 1, j[-1] - 1] + 1e-7
