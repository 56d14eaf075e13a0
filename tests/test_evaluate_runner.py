"""The suite end to end on vendored excerpts: every task kind, one-hot, a random-init model embedded through
protlm.embedding and precomputed embeddings; the report; resume; errors through the command line."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import protlm
from protlm.cli.allocator import find_allocator
from protlm.cli.main import main
from protlm.evaluate import DirectorySource, ModelSource, OneHotSource, load_suite, run_suite, write_report
from protlm.evaluate.datasets import load_dataset

EVAL = os.path.join(os.path.dirname(__file__), "data", "eval")

SUITE = {
    "name": "mini",
    "data_root": EVAL,
    "seeds": [7, 0],
    "training": {"epochs": 2, "warmup_steps": 2, "grad_accum": 4, "precision": "fp32"},
    "quick": {"training": {"epochs": 1}, "max_train": 10, "max_valid": 4, "max_test": 5, "max_folds": 2},
    "datasets": {
        "flip_ss3": {"format": "flip_ss", "files": {"sequences": "flip_ss3_sequences.fasta",
                                                    "labels": "flip_ss3_labels.fasta", "mask": "flip_ss3_mask.fasta"}},
        "cb513": {"format": "ss_csv", "files": {"all": "CB513_excerpt.csv"}},
        "casp12": {"format": "ss_csv", "files": {"all": "CASP12_excerpt.csv"}},
        "casp14_ss": {"format": "ss_csv", "files": {"all": "casp14_ssp_expected.csv"}},
        "casp14_contacts": {"format": "pdb_contacts", "files": {"all": "casp14_pdb"}},
        "gb1": {"format": "flip_csv", "files": {"path": "gb1_three_vs_rest_excerpt.csv"}},
        "fluorescence": {"format": "tape_fluorescence", "files": {"train": "fluorescence_train.json",
                                                                   "valid": "fluorescence_valid.json",
                                                                   "test": "fluorescence_test.json"}},
        "proteinnet": {"format": "proteinnet", "files": {"train": "proteinnet_fixture.txt", "valid": "proteinnet_fixture.txt",
                                                         "test": "proteinnet_fixture.txt"}},
        "absent": {"format": "ss_csv", "files": {"all": "not_here.csv"}, "unavailable": "not reachable in tests"},
        "deeploc": {"format": "deeploc_fasta", "files": {"train": "deeploc_val_excerpt.fasta",
                                                         "test": "deeploc_test_excerpt.fasta"}},
        "deeploc_prottrans": {"format": "deeploc_csv", "files": {"all": "deeploc_prottrans_excerpt.csv"}},
    },
    "tasks": [
        {"name": "SSP-3", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
         "train": "flip_ss3/train", "valid": "flip_ss3/valid",
         "test": {"CASP12": "casp12", "CASP14": "casp14_ss", "NEW364": "flip_ss3/test"}},
        {"name": "SSP-8", "kind": "residue_classification", "label": "ss8", "classes": list("GHIBESTC"),
         "label_map": {"P": "C"}, "train": "cb513", "valid": {"holdout": 0.2}, "test": {"CASP14": "casp14_ss"},
         "deviations": ["trained on CB513"]},
        {"name": "FL", "kind": "protein_regression", "label": "fitness", "train": "fluorescence/train",
         "valid": "fluorescence/valid", "test": {"TAPE": "fluorescence/test"}},
        {"name": "GB1", "kind": "protein_regression", "label": "fitness", "train": "gb1/train", "valid": "gb1/valid",
         "test": {"FLIP": "gb1/test"}},
        {"name": "CP", "kind": "contact", "label": "contacts", "train": "proteinnet/train", "valid": "proteinnet/valid",
         "test": {"ProteinNet": "proteinnet/test"}, "metrics": ["P@L", "P@L/5"]},
        {"name": "CP-CASP14", "kind": "contact", "label": "contacts", "protocol": "leave_one_out",
         "data": "casp14_contacts", "loo_valid": 1, "test_name": "CASP14", "metrics": ["P@L", "P@L/5", "P@L-long"],
         "training": {"grad_accum": 1}},
        {"name": "Localization", "kind": "protein_classification", "label": "location",
         "classes": ["Cell.membrane", "Cytoplasm", "Endoplasmic.reticulum", "Extracellular", "Golgi.apparatus",
                     "Lysosome/Vacuole", "Mitochondrion", "Nucleus", "Peroxisome", "Plastid"],
         "exclude_labels": ["Cytoplasm-Nucleus"], "train": "deeploc/train", "valid": {"holdout": 0.2},
         "test": {"DeepLoc": "deeploc/test", "ProtTrans": "deeploc_prottrans"}},
        {"name": "Membrane", "kind": "protein_classification", "label": "membrane", "classes": ["M", "S"],
         "exclude_labels": ["U"], "train": "deeploc/train", "valid": {"holdout": 0.2}, "test": {"DeepLoc": "deeploc/test"}},
        {"name": "Absent", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
         "train": "absent", "valid": {"holdout": 0.5}, "test": {"x": "absent"}},
    ],
}


# Small models on a shared CPU: a second thread only adds synchronisation (several times slower here).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def suite_file(tmp_path):
    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    return str(p)


def _embed_dir(suite, directory, tiny_config):
    """Per-residue embeddings of every dataset, from a random-init model through model.encode, in the store
    format (one HDF5 per dataset): what a user with their own embedder would hand to --embeddings."""
    import h5py

    from protlm.embedding.store import safe_key

    pre = protlm.random_init(tiny_config, seed=3, encoder_only=True)
    os.makedirs(directory, exist_ok=True)
    for name, spec in suite.datasets.items():
        if spec.missing_files():
            continue
        seqs = {}
        for recs in load_dataset(name, spec.format, spec.files).values():
            for r in recs:
                seqs.setdefault(r.id, r.sequence)
        with h5py.File(os.path.join(directory, f"{name}.h5"), "w") as fh:
            fh.attrs["kind"] = "per_residue"
            for oid, seq in seqs.items():
                batch = pre.tokenizer.batch_encode([seq], prefix="nlu")
                with torch.no_grad():
                    h = pre.model.encode(batch.input_ids, batch.attention_mask).last_hidden_state[0]
                ds = fh.create_dataset(safe_key(oid), data=h[1:1 + len(seq)].numpy())
                ds.attrs["original_id"] = oid


@pytest.mark.slow
def test_suite_end_to_end_resume_and_report(tmp_path, suite_file, tiny_config):
    suite = load_suite(suite_file)
    emb = str(tmp_path / "emb")
    _embed_dir(suite, emb, tiny_config)
    sources = [OneHotSource(), DirectorySource(emb, "odd-random")]
    out = str(tmp_path / "out")
    run = run_suite(suite, sources, out, progress=False, log=lambda s: None, write_report=write_report)
    assert run.skipped == {"Absent": "absent: not reachable in tests"}
    names = {(c.source, c.task) for c in run.cells}
    assert len(names) == 2 * 8
    for c in run.cells:
        assert c.trained_units > 0 and c.resumed_units == 0
        for test, metrics in c.values.items():
            for metric, values in metrics.items():
                assert len(values) == 2 and all(np.isfinite(values)), (c.source, c.task, test, metric, values)
    cp = next(c for c in run.cells if c.task == "CP-CASP14" and c.source == "one-hot")
    assert cp.trained_units == 2 * 3  # two seeds x three leave-one-out folds
    md = open(os.path.join(out, "report.md")).read()
    assert "| SSP-3 | CASP12 | Q3 |" in md and "| CP-CASP14 | CASP14 | P@L/5 |" in md
    assert "| Absent | x | Q3 | n/a (data not reachable) | n/a (data not reachable) |" in md
    assert "**SSP-8**: trained on CB513" in md and "epochs 2 (Table 4: 20)" in md
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    # every seed: 2 sources x (SSP-3 3 + SSP-8 1 + FL 1 + GB1 1 + CP 2 + CP-CASP14 3 + Loc 2 + Membrane 1) x 2 seeds
    assert len(rows) == 2 * 14 * 2 and {r["seed"] for r in rows} == {"7", "0"}
    js = json.load(open(os.path.join(out, "results.json")))
    assert js["profile"] == "full" and len(js["results"]) == 2 * 14 and js["skipped"]

    # a finished suite resumes without training anything and reports the same numbers
    again = run_suite(load_suite(suite_file), sources, out, progress=False, log=lambda s: None)
    assert all(c.trained_units == 0 and c.resumed_units > 0 for c in again.cells)
    assert [c.values for c in again.cells] == [c.values for c in run.cells]

    # a partly finished suite trains only what is missing
    os.remove(os.path.join(out, "units", "one-hot", "GB1", "seed0.json"))
    part = run_suite(load_suite(suite_file), sources, out, progress=False, log=lambda s: None, tasks=["GB1"])
    gb1 = {c.source: c for c in part.cells}
    assert gb1["one-hot"].trained_units == 1 and gb1["one-hot"].resumed_units == 1
    assert gb1["odd-random"].trained_units == 0

    # changed settings are not mixed with old results
    changed = run_suite(load_suite(suite_file, ["training.epochs=1"]), sources[:1], out, progress=False,
                        log=lambda s: None, tasks=["GB1"])
    assert changed.cells[0].trained_units == 2


def test_model_source_embeds_through_protlm_embed_and_caches(tmp_path, suite_file):
    suite = load_suite(suite_file, ["seeds=[7]"])
    cache = str(tmp_path / "cache")
    src = ModelSource("debug", random_init_of="debug", cache_dir=cache, threads=1)
    assert src.name == "debug (random init)" and src.baseline
    s2s = ModelSource("debug", random_init_of="debug", cache_dir=cache, prefix="s2s")
    assert s2s.name == "debug (random init) [S2S]" and s2s.key == src.key + "-s2s"  # a column per prefix
    run = run_suite(suite, [src], str(tmp_path / "out"), quick=True, tasks=["SSP-3", "GB1"], progress=False,
                    log=lambda s: None)
    assert all(c.embed_seconds > 0 for c in run.cells)
    files = sorted(os.listdir(os.path.join(cache, src.key)))
    assert files == ["casp12.layer-1.auto.h5", "casp14_ss.layer-1.auto.h5", "flip_ss3.layer-1.auto.h5",
                     "gb1.layer-1.auto.h5"]
    # the full profile adds the missing ids to the cached files instead of starting over
    src2 = ModelSource("debug", random_init_of="debug", cache_dir=cache, threads=1)
    prepared = src2.prepare("gb1", [r for v in load_dataset("gb1", "flip_csv", suite.datasets["gb1"].files).values()
                                    for r in v], progress=False)
    assert 0 < prepared.embedded < 88


def test_quick_profile_subsets(tmp_path, suite_file):
    run = run_suite(load_suite(suite_file, ["seeds=[7]"]), [OneHotSource()], str(tmp_path / "q"), quick=True,
                    tasks=["SSP-3", "CP-CASP14"], progress=False, log=lambda s: None)
    ssp = next(c for c in run.cells if c.task == "SSP-3")
    assert ssp.n["train"] == 10 and ssp.n["valid"] == 4 and ssp.n["test:NEW364"] == 5
    cp = next(c for c in run.cells if c.task == "CP-CASP14")
    assert cp.trained_units == 2  # max_folds
    assert not os.path.exists(os.path.join(str(tmp_path / "q"), "report.md"))  # no write_report given


@pytest.mark.usefixtures("one_thread")
def test_jobs_train_units_in_parallel_with_the_same_results(tmp_path, suite_file, monkeypatch):
    from protlm.evaluate import runner

    suite = load_suite(suite_file)
    tasks = ["SSP-3", "GB1", "CP-CASP14"]
    logs: list[str] = []
    one = run_suite(suite, [OneHotSource()], str(tmp_path / "one"), quick=True, tasks=tasks, progress=False,
                    log=lambda s: None)
    cost = {"SSP-3": 1.0, "GB1": 3.0, "CP-CASP14": 2.0}
    monkeypatch.setattr(runner, "unit_cost", lambda task, cfg, data: cost[task.name])
    two = run_suite(suite, [OneHotSource()], str(tmp_path / "two"), quick=True, tasks=tasks, progress=False,
                    log=logs.append, jobs=2, job_threads=1)
    started = [m.split(" | ")[1] for m in logs if m.startswith("started: ")]
    assert list(dict.fromkeys(started)) == ["GB1", "CP-CASP14", "SSP-3"]  # the costliest units start first
    assert [(c.task, c.values) for c in two.cells] == [(c.task, c.values) for c in one.cells]  # reported in suite order
    assert [c.trained_units for c in two.cells] == [2, 2, 4] and all(c.resumed_units == 0 for c in two.cells)
    assert sum(m.startswith("started: ") for m in logs) == 8 and sum(m.startswith("done: ") for m in logs) == 8
    # the unit files are the results: a re-run with jobs reads them back
    again = run_suite(suite, [OneHotSource()], str(tmp_path / "two"), quick=True, tasks=tasks, progress=False,
                      log=lambda s: None, jobs=2)
    assert all(c.trained_units == 0 for c in again.cells)
    assert [c.values for c in again.cells] == [c.values for c in two.cells]


def test_a_failing_unit_process_is_a_clear_error_and_keeps_finished_units(tmp_path, suite_file, monkeypatch):
    from protlm.errors import ProtlmError
    from protlm.evaluate import runner

    real = runner._train_unit

    def flaky(task, fold, *args, **kwargs):
        if task.name == "GB1":
            raise RuntimeError("injected failure")
        return real(task, fold, *args, **kwargs)

    monkeypatch.setattr(runner, "_train_unit", flaky)
    monkeypatch.setattr(runner, "unit_cost", lambda task, cfg, data: 0.0)  # keep suite order: SSP-3 first
    out = str(tmp_path / "out")
    with pytest.raises(ProtlmError, match=r"GB1 \| seed (7|0): the unit process ended with exit code 1"):
        run_suite(load_suite(suite_file), [OneHotSource()], out, quick=True, tasks=["SSP-3", "GB1"],
                  progress=False, log=lambda s: None, jobs=2)
    assert sorted(os.listdir(os.path.join(out, "units", "one-hot", "SSP-3"))) == [
        "seed0.head", "seed0.json", "seed7.head", "seed7.json"]  # each finished unit with its head bundle


def test_unit_cost_counts_residues_attention_and_folds():
    from types import SimpleNamespace as NS

    from protlm.evaluate.runner import unit_cost
    from protlm.evaluate.tasks import TaskExample

    ex = lambda n: TaskExample("p", "d", n, None)
    cfg = NS(epochs=2)
    per_residue = NS(kind="residue_classification")
    one_fold = NS(folds=[NS(train=[ex(256), ex(512)])])
    assert unit_cost(per_residue, cfg, one_fold) == 2 * (256 + 256 + 512 + 1024)
    two_folds = NS(folds=[NS(train=[ex(256)]), NS(train=[ex(512)])])  # a unit is one fold: the mean
    assert unit_cost(per_residue, cfg, two_folds) == 2 * (512 + 1536) / 2
    assert unit_cost(NS(kind="contact"), cfg, one_fold) == 8 * unit_cost(per_residue, cfg, one_fold)


def test_jobs_refuse_a_gpu(tmp_path, suite_file):
    from protlm.errors import ConfigError

    with pytest.raises(ConfigError, match="forked process cannot use cuda"):
        run_suite(load_suite(suite_file), [OneHotSource()], str(tmp_path), quick=True, tasks=["GB1"],
                  device="cuda", progress=False, log=lambda s: None, jobs=2)


def test_cli_evaluate_and_its_errors(tmp_path, suite_file, capsys):
    out = str(tmp_path / "cli")
    code = main(["evaluate", "--suite", suite_file, "--tasks", "GB1", "--out", out, "--no-progress", "--quick",
                 "--set", "seeds=[7]", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| GB1 | FLIP | Spearman |" in printed and os.path.exists(os.path.join(out, "results.csv"))
    # export the sequences a user would embed elsewhere
    assert main(["evaluate", "--suite", suite_file, "--tasks", "GB1", "--export-fasta", str(tmp_path / "fa")]) == 0
    assert open(tmp_path / "fa" / "gb1.fasta").read().count(">") == 88
    # embeddings missing for some ids: one line, names the file and the count, no traceback
    emb = tmp_path / "emb"
    emb.mkdir()
    import h5py

    with h5py.File(emb / "gb1.h5", "w") as fh:
        ds = fh.create_dataset("x", data=np.zeros((265, 8), np.float32))
        ds.attrs["original_id"] = "seq-0000"
    proc = subprocess.run([sys.executable, "-m", "protlm.cli.main", "evaluate", "--suite", suite_file, "--tasks", "GB1",
                           "--embeddings", f"e={emb}", "--no-baselines", "--out", str(tmp_path / "bad"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "gb1.h5: embeddings missing for 40 of 40 proteins of task 'GB1' split 'train'" in err
    # the command line restarted itself under tcmalloc when this machine has it (protlm.cli.allocator)
    assert f"malloc: {find_allocator() or 'system'}" in proc.stdout
    # unknown --set key
    assert main(["evaluate", "--suite", suite_file, "--set", "trainng.epochs=1"]) == 2
    assert "did you mean 'training'" in capsys.readouterr().err
    # a model's twin asked for again
    assert main(["evaluate", "--suite", suite_file, "--model", "tiny", "--random-init", "tiny"]) == 2
    assert "tiny (random init) is listed twice (each --model already brings its random-init twin" in capsys.readouterr().err


def test_casp14_ssp_command_reproduces_the_staged_table(tmp_path):
    if shutil.which("mkdssp") is None:
        pytest.skip("mkdssp (Debian package dssp) is not installed")
    out = tmp_path / "c14.csv"
    assert main(["data", "casp14-ssp", os.path.join(EVAL, "casp14_pdb"), "-o", str(out)]) == 0
    expected = open(os.path.join(EVAL, "casp14_ssp_expected.csv"), newline="").read().replace("\r\n", "\n")
    assert out.read_text() == expected


def test_checkpoint_and_its_random_init_twin(tmp_path, tiny_config):
    ckpt = str(tmp_path / "runs" / "mine" / "final")
    pre = protlm.random_init(tiny_config, seed=5)
    protlm.save_pretrained(pre.model, ckpt, pre.tokenizer)
    cache = str(tmp_path / "cache")
    model = ModelSource(ckpt, cache_dir=cache, threads=1)
    twin = ModelSource(ckpt, random_init_of=ckpt, cache_dir=cache, threads=1)
    assert model.name == "mine/final" and twin.name == "mine/final (random init)" and model.key != twin.key
    recs = load_dataset("c12", "ss_csv", {"all": os.path.join(EVAL, "CASP12_excerpt.csv")})["all"]
    a = model.prepare("casp12", recs, progress=False).arrays
    b = twin.prepare("casp12", recs, progress=False).arrays
    first = recs[0].id
    assert a[first].shape == b[first].shape == (len(recs[0].sequence), 40)
    assert not np.allclose(a[first], b[first])
    # the trained weights are what gets embedded: same as encoding with the saved model directly
    batch = pre.tokenizer.batch_encode([recs[0].sequence], prefix="nlu")
    with torch.no_grad():
        ref = pre.model.encode(batch.input_ids, batch.attention_mask).last_hidden_state[0, 1:-1].numpy()
    np.testing.assert_allclose(a[first], ref, atol=1e-4, rtol=1e-4)
