"""``protlm analyze depth --compare``: tiny depth runs of a T5 and an ESM made with the command line (and copies of
the ESM run as a DPLM-marked and an encoder-only model record them), compared; the table must hold the runs' own numbers at l/N, and runs that measured
different things must be refused in one line naming the difference."""

import csv
import json
import math
import os
import shutil

import pytest
import torch

import protlm
import protlm.convert
from protlm.analysis.compare import MEASURES, compare_runs, objective_of
from protlm.cli.main import main
from protlm.config import EsmConfig
from protlm.errors import ConfigError, InputError

from .conftest import DATA, odd_config

FASTA = os.path.join(DATA, "ecoli_k12_excerpt.fasta")
PROBE_DATA = os.path.join(DATA, "ssp3_flip_excerpt")
DEPTH = ["--max-proteins", "4", "--max-length", "40", "--probe-data", PROBE_DATA, "--probe-train", "10",
         "--probe-test", "4", "--cka-tokens", "256", "--quiet", "--dtype", "fp32"]


def _esm(seed=0):
    cfg = EsmConfig(hidden_size=36, num_hidden_layers=4, num_attention_heads=3, intermediate_size=37)
    return protlm.convert.load(cfg, random_init=True, seed=seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> run directory: ``protlm analyze depth`` on a random-init twin of a 3-layer T5 and on a 4-layer ESM
    (CLI runs; their plots dominate the time), plus copies of the ESM run as its DPLM-marked and encoder-only
    versions would record them."""
    tmp = tmp_path_factory.mktemp("depth-runs")
    torch.manual_seed(0)
    t5 = protlm.random_init(odd_config(num_layers=3, num_decoder_layers=2), seed=1)
    protlm.save_pretrained(t5.model, tmp / "models" / "t5", t5.tokenizer)
    esm = _esm(seed=2)
    protlm.save_pretrained(esm.model, tmp / "models" / "esm", esm.tokenizer)
    out = {name: str(tmp / "runs" / name) for name in ("t5", "esm")}
    assert main(["analyze", "depth", str(tmp / "models" / "t5"), FASTA, "-o", out["t5"], "--random-init", *DEPTH]) == 0
    assert main(["analyze", "depth", str(tmp / "models" / "esm"), FASTA, "-o", out["esm"], *DEPTH]) == 0
    out["dplm"] = _copy(out["esm"], tmp / "runs" / "dplm", lambda d: d["model"].update(family="dplm"))
    out["esm-enc"] = _copy(out["esm"], tmp / "runs" / "esm-enc", _encoder_only)
    return out


def _encoder_only(d):
    """What depth.json records for a masked LM loaded without its head (see test_analysis_esm.py)."""
    d["model"].update(output=None, output_means=None)
    d["options"]["analyses"].remove("early-exit")
    d["encoder"].update(early_exit=None)
    d["encoder"]["skip"].update(output_kl=None, output_top1_agreement=None)
    d["full_model"] = {}


def _depth(run_dir):
    with open(os.path.join(run_dir, "depth.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _copy(run_dir, dst, edit):
    """A copy of a run whose depth.json ``edit`` changed: what a run made with other settings would record."""
    shutil.copytree(run_dir, dst)
    data = _depth(dst)
    edit(data)
    with open(os.path.join(dst, "depth.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return str(dst)


def _expected(depth: dict) -> dict[tuple[int, str], float]:
    """(layer, measure) -> value, read straight from one run's depth.json encoder stack."""
    enc, want = depth["encoder"], {}
    for i, l in enumerate(enc["contribution"]["layers"]):
        want[l, "layer_rel"] = enc["contribution"]["layer_rel"]["mean"][i]
    if enc["skip"]["output_kl"] is not None:
        for i, l in enumerate(enc["skip"]["skipped"]):
            want[l, "skip_kl"] = enc["skip"]["output_kl"]["mean"][i]
            want[l, "skip_top1"] = enc["skip"]["output_top1_agreement"]["mean"][i]
    if enc["early_exit"] is not None:
        for i, l in enumerate(enc["early_exit"]["layers"]):
            want[l, "early_exit_top1"] = enc["early_exit"]["top1_agreement"]["mean"][i]
            want[l, "early_exit_kl"] = enc["early_exit"]["kl"]["mean"][i]
    for i, l in enumerate(enc["similarity"]["layers"]):
        want[l, "cka_final"] = enc["similarity"]["cka"][i][-1]
    for l, s in zip(enc["probe"]["layers"], enc["probe"]["score"]):
        want[l, "probe"] = s
    return want


@pytest.mark.slow  # the fixture's two CLI runs (their PNG plots take most of the time)
def test_compare_writes_the_runs_numbers_at_relative_depth(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    order = ["t5", "esm", "dplm", "esm-enc"]
    assert main(["analyze", "depth", "--compare", *[runs[n] for n in order], "-o", str(out), "--labels", "t5", "esm",
                 "dplm", "esm-enc"]) == 0
    table = json.loads((out / "compare.json").read_text())
    labels = [r["label"] for r in table["runs"]]
    assert labels == order
    assert [r["objective"] for r in table["runs"]] == ["encoder-decoder denoising", "masked", "diffusion", "masked"]
    with open(out / "compare.csv", newline="", encoding="utf-8") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(table["rows"])
    for name, label in zip(order, labels):
        depth = _depth(runs[name])
        n = depth["encoder"]["n_layers"]
        rows = [r for r in table["rows"] if r["model"] == label and r["stack"] == "encoder"]
        assert [r["layer"] for r in rows] == list(range(n + 1))
        assert [r["relative_depth"] for r in rows] == [l / n for l in range(n + 1)]
        want = _expected(depth)
        for r in rows:
            for m in [m for m, _, _ in MEASURES] + ["early_exit_kl"]:
                assert r[m] == want.get((r["layer"], m)), (name, r["layer"], m)
    # the CSV holds the same numbers (to its 6 significant digits)
    for r, c in zip(table["rows"], csv_rows):
        assert c["model"] == r["model"] and int(c["layer"]) == r["layer"]
        for m, _, _ in MEASURES:
            assert (c[m] == "") == (r[m] is None)
            if r[m] is not None:
                assert math.isclose(float(c[m]), r[m], rel_tol=1e-5, abs_tol=1e-12)
    # T5's decoder rows are in the table (at their own l/M), not drawn
    dec = [r for r in table["rows"] if r["stack"] == "decoder"]
    assert [r["relative_depth"] for r in dec] == [0, 0.5, 1] and all(r["model"] == labels[0] for r in dec)
    # the encoder-only run cannot exit early: it lacks that measure, and the report says why
    enc_only = table["runs"][3]
    assert set(enc_only["missing"]) == {"skip_kl", "skip_top1", "early_exit_top1"}
    assert "no output head" in enc_only["missing"]["early_exit_top1"]
    assert table["runs"][1]["missing"] == {}
    md = (out / "compare.md").read_text()
    assert all(f"| {label} |" in md for label in labels) and "no output head" in md
    assert "| t5 | encoder-decoder denoising | random init |" in md and "| esm | masked | trained |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not drawn: skip_kl (no output head" in capsys.readouterr().out


def test_objective_names_follow_kind_and_family():
    assert objective_of({"kind": "causal-lm", "family": "protgpt2"}) == "autoregressive"
    assert objective_of({"kind": "masked-lm", "family": "dplm"}) == "diffusion"
    assert objective_of({"kind": "masked-lm", "family": "esm2"}) == "masked"
    assert objective_of({"kind": "encoder-decoder", "family": "ankh3"}) == "encoder-decoder denoising"


@pytest.mark.slow  # the fixture's two CLI runs (their PNG plots take most of the time)
def test_labels_and_two_runs_of_one_model(runs, tmp_path):
    twin = _copy(runs["esm"], tmp_path / "seed1", lambda d: d["options"].update(seed=1))
    cmp = compare_runs([runs["esm"], twin])
    assert cmp.runs[0].label != cmp.runs[1].label and cmp.runs[1].label.endswith("[seed1]")
    assert any("seed" in n for n in cmp.notes)  # a different seed is allowed, and reported
    assert [r.label for r in compare_runs([runs["esm"], twin], ["a", "b"]).runs] == ["a", "b"]
    with pytest.raises(ConfigError, match="2 labels for 1 runs"):
        compare_runs([runs["esm"]], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    (lambda d: d["options"].update(mask_rate=0.3), r"has mask rate \(--mask-rate\) 0.15, run .* has 0.3"),
    (lambda d: d["options"].update(max_length=64), r"crop length \(--max-length\) 40, run .* has 64"),
    (lambda d: d["encoder"].update(probe=None) or d["options"]["analyses"].remove("probe"),
     r"has probe task ssp3 on FLIP secondary_structure split in .*ssp3_flip_excerpt.*, run .* has no probe"),
    (lambda d: d["encoder"]["probe"].update(source="FLIP split in elsewhere"), r"has probe task ssp3 on .*elsewhere"),
    (lambda d: d["options"].update(seed=5) or d["encoder"]["probe"].update(source=d["encoder"]["probe"]["source"] + "!"),
     r"drew its probe proteins with --seed 0, run .* with --seed 5; with probes, rerun with the same --seed"),
    (lambda d: d["inputs"]["ids"].__setitem__(1, "other"), r"analysed 4 proteins .* \(record 2: .* vs other\)"),
    (lambda d: d["encoder"].update(similarity=None) or d["options"]["analyses"].remove("cka"),
     r"ran the cka analysis, run .* did not"),
])
def test_runs_that_measured_different_things_are_refused(runs, tmp_path, edit, message):
    other = _copy(runs["esm"], tmp_path / "other", edit)
    with pytest.raises(ConfigError, match=message):
        compare_runs([runs["t5"], other])


@pytest.mark.slow  # the fixture's two CLI runs (their PNG plots take most of the time)
def test_bad_run_directories_are_one_line_errors(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no depth.json"):
        compare_runs([runs["t5"], str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no such run directory"):
        compare_runs([str(tmp_path / "absent")])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / ".depth-state.pt").write_bytes(b"")
    with pytest.raises(InputError, match="unfinished depth run"):
        compare_runs([str(tmp_path / "unfinished")])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "depth.json").write_text('{"model": {}\n,,')
    with pytest.raises(InputError, match="depth.json: line 2: not valid JSON"):
        compare_runs([str(tmp_path / "broken")])
    assert main(["analyze", "depth", "--compare", runs["t5"], str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert main(["analyze", "depth", "model-dir", "--compare", runs["t5"], "-o", str(tmp_path / "o")]) == 2
    assert main(["analyze", "depth", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "no depth.json" in err[0] and "drop 'model-dir'" in err[1] and "needs MODEL" in err[2]
    assert not os.path.exists(tmp_path / "o")
