"""protlm train-head: label readers (CSV/TSV, biotrainer FASTA and its three-file per-residue protocol), bad input
as one-line errors, every kind end to end on a random-init model, and consistency with protlm evaluate."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

from protlm.cli.main import main
from protlm.errors import InputError
from protlm.evaluate import ModelSource, load_suite, run_suite
from protlm.evaluate.bundle import load_bundle
from protlm.evaluate.custom import TrainHeadSettings, run_train_head
from protlm.evaluate.datasets import read_deeploc_fasta
from protlm.evaluate.heads import LightHead, LightHeadConfig
from protlm.evaluate.labels import read_labels
from protlm.evaluate.training import bootstrap_interval, score_rows
from protlm.settings import override

DATA = os.path.join(os.path.dirname(__file__), "data")
EVAL = os.path.join(DATA, "eval")
BIOTRAINER = os.path.join(DATA, "biotrainer")
FLIP = {"sequences": os.path.join(EVAL, "flip_ss3_sequences.fasta"), "mask": os.path.join(EVAL, "flip_ss3_mask.fasta")}
FLIP_LABELS = os.path.join(EVAL, "flip_ss3_labels.fasta")
QUICK = ["--set", "training.epochs=2", "--set", "training.warmup_steps=2", "--set", "training.grad_accum=4",
         "--set", "training.precision=fp32", "--no-progress", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, text):
    path.write_text(text)
    return str(path)


def _deeploc_rows(n=40):
    """(id, sequence, location) of real DeepLoc proteins, the vendored excerpt."""
    recs = read_deeploc_fasta(os.path.join(EVAL, "deeploc_val_excerpt.fasta"))[:n]
    return [(r.id, r.sequence, r.labels["location"]) for r in recs]


# --- readers -----------------------------------------------------------------------------------------------------
def test_csv_kinds_are_read_and_inferred(tmp_path):
    res = read_labels(_write(tmp_path / "r.csv", "id,sequence,label\na,MKTAY,CCHH-\nb,MKV,HHE\n"))
    assert res.kind == "residue_classification" and not res.has_splits
    a = res.splits["all"][0]
    assert a.mask.tolist() == [True, True, True, True, False] and a.labels["label"][:4] == "CCHH"
    assert read_labels(_write(tmp_path / "g.tsv", "id\tsequence\tlabel\na\tMKTAY\t1.5\nb\tMKV\t-2e1\n")).kind == "protein_regression"
    multi = read_labels(_write(tmp_path / "m.csv", "id,sequence,label\na,MKTAY,x;y\nb,MKV,y\nc,MKV,\n"))
    assert multi.kind == "protein_multilabel"
    assert [r.labels["label"] for r in multi.records()] == [("x", "y"), ("y",), ()]
    cls = read_labels(_write(tmp_path / "c.csv", "id,sequence,label,set\na,MKTAY,Nucleus,train\nb,MKV,Cyto,val\nc,MKV,Cyto,test2\n"))
    assert cls.kind == "protein_classification" and sorted(cls.splits) == ["test2", "train", "valid"]


def test_biotrainer_fasta_both_generations(tmp_path):
    new = read_labels(os.path.join(BIOTRAINER, "residue_to_class_masked.fasta"))
    assert new.kind == "residue_classification" and sorted(new.splits) == ["test", "train", "valid"]
    seq1 = new.splits["train"][0]
    assert seq1.id == "Seq1" and seq1.mask.tolist() == [c == "1" for c in "01101101"]
    old = read_labels(_write(tmp_path / "o.fasta", ">P1 TARGET=Glob SET=train VALIDATION=False\nMKT\n"
                                                   ">P2 TARGET=TM SET=train VALIDATION=True\nMKV\n"
                                                   ">P3 TARGET=TM SET=test VALIDATION=False\nMKA\n>P4 SET=pred\nMKK\n"))
    assert {k: [r.id for r in v] for k, v in old.splits.items()} == {"train": ["P1"], "valid": ["P2"], "test": ["P3"]}
    assert old.left_out == 1
    three = read_labels(FLIP_LABELS, **FLIP)  # biotrainer's older per-residue protocol (FLIP's layout)
    assert three.kind == "residue_classification"
    assert {k: len(v) for k, v in three.splits.items()} == {"train": 40, "valid": 10, "test": 10}


@pytest.mark.parametrize("text, name, kind, message", [
    ("id,sequence\na,MKT\n", "x.csv", None, "line 1: missing column(s) label"),
    ("id,sequence,label\na,MKT,CCHH\n", "x.csv", "residue", "line 2: record 'a': the per-residue label has 4 characters but the sequence has 3"),
    ("id,sequence,label\na,MKTAY,CCHHC\nb,MKTAY,CCHHC\nc,MKV,CC\n", "x.csv", None, "line 4: record 'c': the per-residue label has 2"),
    ("id,sequence,label\na,MKT,1.5\nb,MKV,high\n", "x.csv", None, None),  # inferred as classification: no error
    (">a TARGET=CCH SET=train\nMKT\n>b SET=train\nMKV\n", "x.fasta", None, "line 3: record 'b': no TARGET="),
    (">a TARGET=1 SET=training\nMKT\n", "x.fasta", None, "line 1: record 'a': set 'training' is not train"),
])
def test_bad_label_files_name_file_line_record(tmp_path, text, name, kind, message):
    path = _write(tmp_path / name, text)
    if message is None:
        assert read_labels(path).kind == "protein_classification"
        with pytest.raises(InputError, match=r"x\.csv: line 3: record 'b': label 'high' is not a number"):
            read_labels(path, "regression")
        return
    with pytest.raises(InputError) as err:
        read_labels(path, kind)
    assert str(err.value).startswith(path) and message in str(err.value) and "\n" not in str(err.value)


def test_unknown_label_at_test_time_is_an_error_unless_declared(tmp_path):
    labels = read_labels(os.path.join(BIOTRAINER, "sequence_to_class.fasta"))
    src = ModelSource("debug", random_init_of="debug", cache_dir=str(tmp_path / "cache"), threads=1)
    with pytest.raises(InputError, match=r"sequence_to_class\.fasta: line 3: record 'Seq2': label 'GlobSP' \(valid set\) "
                                         r"never occurs in the training records"):
        run_train_head(labels, src, str(tmp_path / "o"), progress=False, log=lambda m: None)
    code = main(["train-head", "debug", "--random-init", os.path.join(BIOTRAINER, "residue_to_class_masked.fasta"),
                 "-o", str(tmp_path / "o2"), "--classes", "D,V,C,Q", "--cache-dir", str(tmp_path / "cache"), *QUICK])
    assert code == 2  # F and E (test set) are outside the declared classes: one line, no traceback


def test_light_heads_are_batch_independent_and_bundle_round_trip(tmp_path):
    from protlm.evaluate.bundle import HeadMeta, save_bundle

    torch.manual_seed(0)
    for kind, n_out in [("residue_classification", 3), ("protein_classification", 4), ("protein_regression", 1),
                        ("protein_multilabel", 3)]:
        for cfg in (LightHeadConfig(), LightHeadConfig(style="linear")):
            head = LightHead(9, kind, n_out, cfg).eval()
            a, b = torch.randn(1, 5, 9), torch.randn(1, 7, 9)
            alone = head(a, torch.ones(1, 5, dtype=torch.bool))
            gap = head.pack_gap
            row = torch.cat([a, torch.randn(1, gap, 9) * 100, b], 1)  # junk in the gap must not leak
            mask = torch.ones(1, row.shape[1], dtype=torch.bool)
            mask[0, 5:5 + gap] = False
            packed = head(row, mask, ((0, 5), (5 + gap, 7)))
            got = packed[0, :5] if kind == "residue_classification" else packed[0]
            assert torch.allclose(got, alone[0], atol=1e-5), (kind, cfg.style)
            meta = HeadMeta(task="t", kind=kind, classes=None if kind == "protein_regression" else list("abcd")[:n_out],
                            in_dim=9, layer=0, prefix="none", head_type="light", head_config=vars(cfg))
            save_bundle(tmp_path / f"{kind}-{cfg.style}", head, meta)
            back = load_bundle(tmp_path / f"{kind}-{cfg.style}").head
            assert torch.equal(back(a, torch.ones(1, 5, dtype=torch.bool)), alone)


def test_bootstrap_interval_brackets_the_metric():
    rng = np.random.default_rng(0)
    rows = [{"correct": int(c), "scored": 1} for c in rng.random(200) < 0.7]
    low, high = bootstrap_interval("protein_classification", "accuracy", [rows], resamples=300)
    value = score_rows("protein_classification", "accuracy", rows)
    assert low < value < high and 0.55 < low and high < 0.85


# --- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["protein", "regression", "multilabel"])
def test_per_protein_kinds_end_to_end(tmp_path, kind):
    rows = _deeploc_rows(40)
    classes = sorted({loc for *_, loc in rows})
    lines = ["id,sequence,label"]
    for i, (rid, seq, loc) in enumerate(rows):
        label = {"protein": loc, "regression": f"{len(seq) / 100 + (i % 3):.3f}",
                 "multilabel": ";".join(sorted({loc, "long" if len(seq) > 150 else "short"}))}[kind]
        lines.append(f"{rid},{seq},{label}")
    path = _write(tmp_path / "mine.csv", "\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    extra = ["--class-weights"] if kind != "regression" else []
    code = main(["train-head", "debug", "--random-init", path, "-o", out, "--kind", kind, "--head", "light",
                 "--seeds", "2", "--split", "0.6,0.2,0.2", "--seed", "3", "--cache-dir", str(tmp_path / "c"),
                 "--patience", "1", *extra, *QUICK])
    assert code == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["proteins"] == {"train": 24, "valid": 8, "test": 8}
    (r,) = res["results"]
    assert r["metric"] == {"protein": "accuracy", "regression": "spearman", "multilabel": "f1_micro"}[kind]
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] or r["mean"] is None
    b = load_bundle(os.path.join(out, "heads", "mine"))
    assert b.meta.head_type == "light" and b.meta.trained_by == "protlm train-head"
    assert b.meta.seed == res["best_seed"]
    if kind == "protein":
        assert b.meta.classes == classes
    assert "| test |" in open(os.path.join(out, "report.md")).read()


@pytest.mark.slow
def test_biotrainer_example_runs_unchanged(tmp_path):
    out = str(tmp_path / "out")
    assert main(["train-head", "debug", "--random-init", os.path.join(BIOTRAINER, "sequence_to_value.fasta"), "-o", out,
                 "--cache-dir", str(tmp_path / "c"), *QUICK]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["kind"] == "protein_regression" and res["proteins"] == {"train": 1, "valid": 1, "test": 2}


@pytest.mark.slow
def test_same_split_and_seed_as_evaluate_gives_the_same_metric(tmp_path):
    """A ConvBERT head from protlm evaluate and one from protlm train-head, on FLIP's SSP-3 split (biotrainer's
    three-file protocol), the same random-init model, seed and settings: the same test accuracy to 1e-6."""
    cache = str(tmp_path / "cache")
    suite = {"name": "one", "data_root": EVAL, "seeds": [0],
             "training": {"epochs": 2, "warmup_steps": 2, "grad_accum": 4, "precision": "fp32"},
             "datasets": {"flip_ss3": {"format": "flip_ss", "files": {"sequences": "flip_ss3_sequences.fasta",
                                                                      "labels": "flip_ss3_labels.fasta",
                                                                      "mask": "flip_ss3_mask.fasta"}}},
             "tasks": [{"name": "SSP-3", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
                        "train": "flip_ss3/train", "valid": "flip_ss3/valid", "test": {"NEW364": "flip_ss3/test"}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    src = ModelSource("debug", random_init_of="debug", cache_dir=cache, threads=1)
    ev = run_suite(load_suite(str(tmp_path / "s.yaml")), [src], str(tmp_path / "ev"), progress=False, log=lambda m: None)
    ev_acc = ev.cells[0].values["NEW364"]["accuracy"][0]
    settings = override(TrainHeadSettings(), {"training.epochs": 2, "training.warmup_steps": 2,
                                              "training.grad_accum": 4, "training.precision": "fp32"})
    th = run_train_head(read_labels(FLIP_LABELS, **FLIP), src, str(tmp_path / "th"), classes=["H", "E", "C"],
                        seeds=[0], settings=settings, progress=False, log=lambda m: None)
    assert abs(th["results"][0]["values"][0] - ev_acc) < 1e-6
    # and a different seed trains a different head (the comparison can fail)
    other = run_train_head(read_labels(FLIP_LABELS, **FLIP), src, str(tmp_path / "th2"), classes=["H", "E", "C"],
                           seeds=[5], settings=settings, progress=False, log=lambda m: None)
    assert other["per_seed"][0]["valid"] != th["per_seed"][0]["valid"] or other["results"][0]["values"][0] != ev_acc


@pytest.mark.slow
def test_per_residue_end_to_end_keeps_every_seed(tmp_path):
    out = str(tmp_path / "out")
    code = main(["train-head", "debug", "--random-init", FLIP_LABELS, "--sequences", FLIP["sequences"], "--mask",
                 FLIP["mask"], "-o", out, "--task", "SSP-3", "--seeds", "7,0", "--keep-heads", "all", "--class-weights",
                 "--cache-dir", str(tmp_path / "c"), *QUICK])
    assert code == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["kind"] == "residue_classification" and res["classes"] == ["C", "E", "H"]
    assert res["proteins"] == {"train": 40, "valid": 10, "test": 10}
    (r,) = res["results"]
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] and r["ci95"][0] < r["ci95"][1]
    for seed, value in zip((7, 0), r["values"]):
        b = load_bundle(os.path.join(out, "heads", "SSP-3", f"seed{seed}"))
        assert b.meta.seed == seed and b.meta.head_type == "convbert"
        assert b.meta.metrics["test"]["accuracy"] == pytest.approx(value)


def test_early_stopping_stops_when_validation_does_not_improve(tmp_path):
    """With a learning rate too small to change any prediction, validation never beats epoch 1: patience 2 stops
    after epoch 3 of 10, while without patience all 10 run."""
    labels = read_labels(_write(tmp_path / "p.csv", "id,sequence,label\n" + "\n".join(
        f"{rid},{seq},{loc}" for rid, seq, loc in _deeploc_rows(12)) + "\n"), "protein")
    src = ModelSource("debug", random_init_of="debug", cache_dir=str(tmp_path / "c"), threads=1)
    settings = override(TrainHeadSettings(), {"training.epochs": 10, "training.lr": 1e-12, "training.warmup_steps": 0,
                                              "training.precision": "fp32"})
    kw = dict(head="linear", classes=sorted({r[2] for r in _deeploc_rows(12)}), settings=settings, progress=False,
              log=lambda m: None)
    stopped = run_train_head(labels, src, str(tmp_path / "a"), patience=2, **kw)
    full = run_train_head(labels, src, str(tmp_path / "b"), **kw)
    assert stopped["per_seed"][0]["epochs_run"] == 3 and full["per_seed"][0]["epochs_run"] == 10
    assert stopped["per_seed"][0]["best_epoch"] == 1
