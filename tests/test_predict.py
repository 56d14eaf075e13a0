"""Head bundles and ``protlm predict``: the bundle round trip and its errors, bundles written by evaluate,
predictions that reproduce the evaluation's test metrics, TSV/HDF5 outputs, stored embeddings, resume."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
import yaml

import protlm
from protlm.cli.main import main
from protlm.errors import CheckpointError
from protlm.evaluate import ModelSource, OneHotSource, load_suite, run_suite
from protlm.evaluate.bundle import HeadMeta, load_bundle, read_meta, save_bundle
from protlm.evaluate.datasets import load_dataset
from protlm.evaluate.heads import ConvBertHead, HeadConfig
from protlm.evaluate.runner import build_task_data

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")
SUITE = {
    "name": "mini-predict",
    "data_root": EVAL,
    "seeds": [7, 0],
    "training": {"epochs": 2, "warmup_steps": 2, "grad_accum": 4, "precision": "fp32"},
    "quick": {"training": {"epochs": 1}, "max_train": 12, "max_valid": 4, "max_test": 6},
    "datasets": {
        "flip_ss3": {"format": "flip_ss", "files": {"sequences": "flip_ss3_sequences.fasta",
                                                    "labels": "flip_ss3_labels.fasta", "mask": "flip_ss3_mask.fasta"}},
        "casp12": {"format": "ss_csv", "files": {"all": "CASP12_excerpt.csv"}},
        "gb1": {"format": "flip_csv", "files": {"path": "gb1_three_vs_rest_excerpt.csv"}},
        "deeploc": {"format": "deeploc_fasta", "files": {"train": "deeploc_val_excerpt.fasta",
                                                         "test": "deeploc_test_excerpt.fasta"}},
    },
    "tasks": [
        {"name": "SSP-3", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
         "train": "flip_ss3/train", "valid": "flip_ss3/valid", "test": {"CASP12": "casp12", "NEW364": "flip_ss3/test"}},
        {"name": "GB1", "kind": "protein_regression", "label": "fitness", "train": "gb1/train", "valid": "gb1/valid",
         "test": {"FLIP": "gb1/test"}},
        {"name": "Membrane", "kind": "protein_classification", "label": "membrane", "classes": ["M", "S"],
         "exclude_labels": ["U"], "train": "deeploc/train", "valid": {"holdout": 0.2}, "test": {"DeepLoc": "deeploc/test"}},
    ],
}
MODEL = "debug"  # random-init preset: the heads' backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One quick evaluate run (one-hot and a random-init model, 2 seeds): its output directory and suite."""
    root = tmp_path_factory.mktemp("predict")
    suite_file = root / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = ModelSource(MODEL, random_init_of=MODEL, cache_dir=str(root / "cache"), dtype="fp32", threads=1)
        run_suite(load_suite(str(suite_file)), [OneHotSource(), src], str(root / "out"), quick=True,
                  progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    return str(root / "out"), str(suite_file), src.key


def _meta(**kw) -> HeadMeta:
    base = dict(task="SSP-3", kind="residue_classification", classes=["H", "E", "C"], in_dim=21, layer=0,
                prefix="none", head_type="convbert", head_config={"num_layers": 1}, backbone={"model": "one-hot"})
    return HeadMeta(**{**base, **kw})


def test_bundle_round_trip_and_tensor_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    head = ConvBertHead(21, "residue_classification", 3, HeadConfig(num_layers=1)).eval()
    d = str(tmp_path / "b")
    save_bundle(d, head, _meta(metrics={"CB513": {"accuracy": float("nan")}}))
    save_bundle(d, head, _meta())  # replacing a bundle leaves nothing else behind
    assert sorted(os.listdir(tmp_path)) == ["b"] and sorted(os.listdir(d)) == ["head.json", "head.safetensors"]
    b = load_bundle(d)
    x, mask = torch.randn(1, 9, 21), torch.ones(1, 9, dtype=torch.bool)
    assert torch.equal(b.head(x, mask), head(x, mask)) and b.meta == _meta()

    tensors = load_file(os.path.join(d, "head.safetensors"))
    gone = dict(tensors)
    del gone["out.weight"]
    save_file(gone, os.path.join(d, "head.safetensors"))
    with pytest.raises(CheckpointError, match=r"head.safetensors: missing tensor 'out.weight'"):
        load_bundle(d)
    save_file({**tensors, "out.extra": torch.zeros(2)}, os.path.join(d, "head.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'out.extra'"):
        load_bundle(d)
    save_file(tensors, os.path.join(d, "head.safetensors"))
    meta = json.load(open(os.path.join(d, "head.json")))
    json.dump({**meta, "in_dim": 24}, open(os.path.join(d, "head.json"), "w"))
    with pytest.raises(CheckpointError, match=r"tensor '.*' is \(.*\), the head described in head.json needs"):
        load_bundle(d)
    json.dump({**meta, "head_type": "nope"}, open(os.path.join(d, "head.json"), "w"))
    with pytest.raises(CheckpointError, match=r"unknown head type 'nope'"):
        load_bundle(d)


def test_evaluate_writes_bundles_best_seed_and_all(evaluated, tmp_path):
    out, suite_file, key = evaluated
    for source in ("one-hot", key):
        for task in ("SSP-3", "GB1", "Membrane"):
            meta = read_meta(os.path.join(out, "heads", source, task))
            units = {s: json.load(open(os.path.join(out, "units", source, task, f"seed{s}.json"))) for s in (7, 0)}
            metric = {"SSP-3": "accuracy", "GB1": "spearman", "Membrane": "accuracy"}[task]
            valid = {s: u["result"]["valid_best"][metric] for s, u in units.items()}
            best = 7 if valid[7] >= valid[0] else 0  # ties go to the first seed of the suite
            assert meta.seed == best and meta.metrics == units[best]["result"]["test"]
            assert meta.trained_by == "protlm evaluate" and meta.task == task
    meta = read_meta(os.path.join(out, "heads", key, "SSP-3"))
    assert meta.backbone["model"] == MODEL and meta.backbone["random_init"] and meta.backbone["embed_dtype"] == "fp32"
    assert meta.layer == 2 and meta.prefix == "nlu" and meta.in_dim == protlm.preset(MODEL).d_model
    assert read_meta(os.path.join(out, "heads", key, "GB1")).target_scale != 1.0

    # --keep-heads all: a resumed run (nothing trained) still lays out every seed's bundle
    out = shutil.copytree(out, str(tmp_path / "copy"))  # the module's other tests read the best-seed layout
    again = run_suite(load_suite(suite_file), [OneHotSource()], out, quick=True, tasks=["GB1"], progress=False,
                      log=lambda s: None, keep_heads="all")
    assert again.cells[0].trained_units == 0
    assert sorted(os.listdir(os.path.join(out, "heads", "one-hot", "GB1"))) == ["seed0", "seed7"]
    assert read_meta(os.path.join(out, "heads", "one-hot", "GB1", "seed0")).seed == 0


def _test_split(suite_file: str, task_name: str):
    suite = load_suite(suite_file)
    task = suite.task(task_name)
    loaded = {ds: load_dataset(ds, suite.datasets[ds].format, suite.datasets[ds].files) for ds in task.datasets()}
    data = build_task_data(suite, task, loaded, quick=True)
    return task, data.folds[0].tests, data.records


def _metric(task, exs, out):
    from protlm.evaluate.metrics import spearman

    if task.kind == "residue_classification":
        hit = total = 0
        for e in exs:
            pred = np.array([task.classes.index(c) for c in out[e.id][task.name].prediction])
            keep = e.target >= 0
            hit, total = hit + int((pred[keep] == e.target[keep]).sum()), total + int(keep.sum())
        return hit / total
    if task.kind == "protein_classification":
        return float(np.mean([task.classes.index(out[e.id][task.name].prediction) == e.target for e in exs]))
    return spearman([out[e.id][task.name].prediction for e in exs], [e.target for e in exs])


@pytest.mark.slow
def test_predict_reproduces_the_evaluation_test_metrics(evaluated):
    out, suite_file, key = evaluated
    pre = protlm.load(MODEL, random_init=True, encoder_only=True)
    for task_name in ("SSP-3", "GB1", "Membrane"):
        task, tests, records = _test_split(suite_file, task_name)
        for source, model in (("one-hot", None), (key, pre)):
            bundle = os.path.join(out, "heads", source, task_name)
            meta = read_meta(bundle)
            for test, exs in tests.items():
                got = protlm.predict(model, [bundle], [(e.id, records[(e.dataset, e.id)].sequence) for e in exs])
                # exactly: the same embeddings (same engine, fp32) and the same head code path as the scoring
                assert _metric(task, exs, got) == meta.metrics[test][task.metrics[0]], (task_name, source, test)


def _fasta(path, records):
    path.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    return str(path)


def test_cli_tsv_h5_embeddings_and_errors(evaluated, tmp_path, capsys):
    out, suite_file, key = evaluated
    task, tests, records = _test_split(suite_file, "SSP-3")
    seqs = [(e.id, records[(e.dataset, e.id)].sequence) for e in tests["CASP12"]]
    fasta = _fasta(tmp_path / "p.fasta", seqs)
    ssp, gb1 = os.path.join(out, "heads", key, "SSP-3"), os.path.join(out, "heads", key, "GB1")
    tsv, h5 = str(tmp_path / "p.tsv"), str(tmp_path / "p.h5")
    assert main(["predict", MODEL, "--random-init", "--heads", ssp, gb1, fasta, "-o", tsv, "--h5", h5]) == 0
    lines = open(tsv).read().splitlines()
    assert lines[0].split("\t") == ["id", "length", "SSP-3", "SSP-3:p(H)", "SSP-3:p(E)", "SSP-3:p(C)", "GB1"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [i for i, _ in seqs]
    with h5py.File(h5) as fh:
        assert list(fh["SSP-3"].attrs["classes"]) == ["H", "E", "C"]
        for (oid, seq), row in zip(seqs, rows):
            probs = fh["SSP-3"][oid][()]
            assert probs.shape == (len(seq), 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)
            assert row[2] == "".join("HEC"[i] for i in probs.argmax(-1)) and len(row[2]) == int(row[1])
            assert np.allclose([float(v) for v in row[3].split(",")], probs[:, 0], atol=6e-4)
            assert float(row[6]) == pytest.approx(float(fh["GB1"][oid][()]), rel=1e-5)
    assert not os.path.exists(h5 + ".parts") and not os.path.exists(tsv + ".partial")

    # stored embeddings: the same predictions without the model
    emb = str(tmp_path / "r.h5")
    assert main(["embed", MODEL, "--random-init", fasta, "--per-residue", emb, "--layers", "2", "--dtype", "fp32",
                 "--no-progress"]) == 0
    tsv2 = str(tmp_path / "stored.tsv")
    assert main(["predict", "--embeddings", emb, "--heads", ssp, fasta, "-o", tsv2]) == 0
    stored = [line.split("\t")[:3] for line in open(tsv2).read().splitlines()[1:]]
    assert stored == [r[:3] for r in rows]
    capsys.readouterr()
    one_more = _fasta(tmp_path / "more.fasta", seqs + [("not_embedded", "MKV")])
    assert main(["predict", "--embeddings", emb, "--heads", ssp, one_more, "-o", tsv2]) == 2
    assert "no embedding for 1 of" in capsys.readouterr().err
    assert main(["predict", "--embeddings", emb, "--heads", ssp, one_more, "-o", tsv2, "--allow-missing"]) == 0

    # a head trained on another backbone: one line naming both
    assert main(["predict", MODEL, "--heads", ssp, fasta, "-o", tsv2]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained on debug (random init, seed 0)" in err and "but MODEL is debug" in err
    assert main(["predict", "tiny", "--random-init", "--heads", ssp, fasta, "-o", tsv2]) == 2
    assert "but MODEL is tiny (random init, seed 0)" in capsys.readouterr().err


def test_cli_resumes_after_the_last_finished_part(evaluated, tmp_path, monkeypatch):
    from protlm.evaluate import predict as P

    out, suite_file, key = evaluated
    task, tests, records = _test_split(suite_file, "SSP-3")
    seqs = [(e.id, records[(e.dataset, e.id)].sequence) for e in tests["CASP12"] + tests["NEW364"]]
    fasta = _fasta(tmp_path / "p.fasta", seqs)
    heads = os.path.join(out, "heads", "one-hot", "SSP-3")
    full = str(tmp_path / "full.tsv")
    monkeypatch.setattr(P, "PART_PROTEINS", 4)
    assert main(["predict", "one-hot", "--heads", heads, fasta, "-o", full, "--h5", full + ".h5"]) == 0
    calls = []
    real = P.Predictor.predict

    def dies_on_third_part(self, part):
        calls.append(len(part))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, part)

    monkeypatch.setattr(P.Predictor, "predict", dies_on_third_part)
    part = str(tmp_path / "part.tsv")
    assert main(["predict", "one-hot", "--heads", heads, fasta, "-o", part, "--h5", part + ".h5"]) == 130
    assert not os.path.exists(part) and os.path.exists(part + ".partial")
    calls.clear()
    monkeypatch.setattr(P.Predictor, "predict", lambda self, p: (calls.append(len(p)), real(self, p))[1])
    assert main(["predict", "one-hot", "--heads", heads, fasta, "-o", part, "--h5", part + ".h5"]) == 0
    assert sum(calls) == len(seqs) - 8  # the two finished parts were not predicted again
    assert open(part).read() == open(full).read()
    with h5py.File(part + ".h5") as a, h5py.File(full + ".h5") as b:
        assert sorted(a["SSP-3"]) == sorted(b["SSP-3"]) and len(a["SSP-3"]) == len(seqs)
        for k in a["SSP-3"]:
            assert np.array_equal(a["SSP-3"][k][()], b["SSP-3"][k][()])
