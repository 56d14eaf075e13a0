"""Depth compared across models: the per-layer measures of several ``depth.json`` files on one relative-depth axis.

``protlm analyze depth --compare RUN_DIR ... -o DIR`` reads finished depth runs (never a model), checks that they
measured the same thing, and writes ``compare.png`` (one panel per measure, one curve per model), ``compare.csv`` /
``compare.json`` (the table behind the curves) and ``compare.md``.

Everything here reads the keys of ``depth.json`` (docs/formats.md), never a family's internals: a run of any model
kind (encoder-decoder, masked LM, causal LM) joins as long as its ``depth.json`` has them. Layer l of an N-block
stack sits at relative depth l/N, so a 6-layer and a 33-layer model share the axis. The curves read the ``encoder``
stack: T5's encoder, a masked LM's only stack, a causal LM's only stack (the protocol exposes it as ``encoder``);
T5's decoder rows are in the table too.

Runs may differ in model (shape, family, weights, precision), seed (unless probes ran: the seed picks the probe's
proteins, which the probe's ``source`` records) and layer subset. They must not differ in
what was measured: the proteins (ids), the crop length, the mask rate, the CKA token budget, the probe (task,
data, train/test proteins) and the analyses that ran, except for one a model cannot run (early exit without an
output head).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field

from protlm.errors import ConfigError, InputError
from protlm.utils import atomic_write_text

# The objective each model kind / family was trained with: the legend's second label.
OBJECTIVE_BY_KIND = {"encoder-decoder": "encoder-decoder denoising", "masked-lm": "masked",
                     "causal-lm": "autoregressive"}
OBJECTIVE_BY_FAMILY = {"dplm": "diffusion"}  # DPLM keeps ESM-2's architecture but trains by discrete diffusion

# (column, panel title, what it is): the measures drawn, one panel each, in this order.
MEASURES = (
    ("layer_rel", "contribution ‖h_l − h_{l−1}‖ / ‖h_{l−1}‖",
     "the block's update relative to the stream it reads (contribution.layer_rel, mean over proteins)"),
    ("skip_kl", "skip block l: output KL(full ‖ skipped), nats",
     "change of the output distribution when block l is removed (skip.output_kl)"),
    ("skip_top1", "skip block l: top-1 agreement with the full model",
     "share of output predictions unchanged when block l is removed (skip.output_top1_agreement)"),
    ("early_exit_top1", "early exit at layer l: top-1 agreement with the full model",
     "share of output predictions of an exit at layer l that match the full model (early_exit.top1_agreement; "
     "T5: the encoder's layer l fed to the decoder; masked/causal LM: the logit lens)"),
    ("cka_final", "linear CKA(layer l, final layer)", "similarity of layer l to the last layer (similarity.cka)"),
    ("probe", "linear probe accuracy (Q3)", "per-residue accuracy of a linear probe on layer l (probe.score)"),
)
EXTRA_COLUMNS = ("early_exit_kl",)  # in the table, not drawn
COLUMNS = ("model", "objective", "random_init", "stack", "layer", "n_layers", "relative_depth") + tuple(
    m for m, _, _ in MEASURES) + EXTRA_COLUMNS

# Options that change what is measured (a difference is an error) and those that do not (reported only).
FATAL_OPTIONS = {"max_length": "crop length (--max-length)", "mask_rate": "mask rate (--mask-rate)",
                 "cka_tokens": "CKA token budget (--cka-tokens)"}


@dataclass
class DepthRun:
    """One finished ``protlm analyze depth`` run, as its ``depth.json`` says."""

    path: str  # the run directory
    data: dict  # depth.json
    label: str = ""
    missing: dict[str, str] = field(default_factory=dict)  # measure -> why this run has none

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def objective(self) -> str:
        return objective_of(self.model)

    @property
    def name(self) -> str:  # how errors name the run
        return f"run {self.path}"


def objective_of(model: dict) -> str:
    """The training objective named in the legend, from ``depth.json``'s ``model.kind`` and ``model.family``."""
    family, kind = model.get("family"), model.get("kind")
    if family in OBJECTIVE_BY_FAMILY:
        return OBJECTIVE_BY_FAMILY[family]
    return OBJECTIVE_BY_KIND.get(kind, kind or "unknown")


def model_name(source: str) -> str:
    """A short name for a ``Pretrained.source``: the Hub id, or a directory's last part (two when the last is a
    generic name such as ``final``), without the ``random-init`` prefix and seed."""
    name = re.sub(r"^random-init |\s+seed=\d+$", "", source)
    if os.sep in name and not name.startswith(("http",)):
        parts = os.path.normpath(name).split(os.sep)
        name = "/".join(parts[-2:]) if parts[-1] in ("final", "model", "checkpoint", "export") else parts[-1]
    return name


# --- reading -----------------------------------------------------------------------------------------------------
def read_run(run_dir: str) -> DepthRun:
    """The run in ``run_dir``; a one-line :class:`InputError` when it is not a finished depth run."""
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, "depth.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(run_dir, ".depth-state.pt")):
            raise InputError(f"{run_dir}: an unfinished depth run (no depth.json yet); resume it with the command "
                             "that started it")
        raise InputError(f"{run_dir}: no depth.json (not the output directory of protlm analyze depth)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a depth.json (the top level is not an object)")
    for key in ("model", "inputs", "options", "encoder"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"{path}: not a depth.json (no {key!r} object)")
    for key in ("kind", "source"):
        if key not in data["model"]:
            raise InputError(f"{path}: model.{key} is missing (written by an older protlm? rerun the analysis)")
    return DepthRun(os.path.normpath(run_dir), data)


def _probe_of(run: DepthRun) -> tuple | None:
    pr = run.data["encoder"].get("probe")
    return None if pr is None else (pr["task"], pr["source"])


def _describe_probe(probe: tuple | None) -> str:
    return "no probe" if probe is None else f"probe task {probe[0]} on {probe[1]}"


def check_comparable(runs: list[DepthRun]) -> list[str]:
    """Raise a one-line :class:`ConfigError` naming the first difference that makes the runs measure different
    things; return the harmless differences, one sentence each, for the report."""
    first = runs[0]
    a = first.data
    for run in runs[1:]:
        b = run.data
        ids_a, ids_b = a["inputs"].get("ids"), b["inputs"].get("ids")
        if ids_a != ids_b:
            what = (f"{len(ids_a or [])} proteins from {a['inputs'].get('path')}",
                    f"{len(ids_b or [])} from {b['inputs'].get('path')}")
            diff = next((i for i, (x, y) in enumerate(zip(ids_a or [], ids_b or [])) if x != y), None)
            at = f" (record {diff + 1}: {ids_a[diff]} vs {ids_b[diff]})" if diff is not None else ""
            raise ConfigError(f"--compare: {first.name} analysed {what[0]}, {run.name} {what[1]}{at}; compare runs "
                              "on the same input (same file and --max-proteins)")
        for key, what in FATAL_OPTIONS.items():
            if a["options"].get(key) != b["options"].get(key):
                raise ConfigError(f"--compare: {first.name} has {what} {a['options'].get(key)}, {run.name} has "
                                  f"{b['options'].get(key)}")
        pa, pb = _probe_of(first), _probe_of(run)
        if pa != pb:
            seeds = (a["options"].get("seed"), b["options"].get("seed"))
            if None not in (pa, pb) and seeds[0] != seeds[1]:  # the seed draws the probe's proteins
                raise ConfigError(f"--compare: {first.name} drew its probe proteins with --seed {seeds[0]}, {run.name} "
                                  f"with --seed {seeds[1]}; with probes, rerun with the same --seed")
            raise ConfigError(f"--compare: {first.name} has {_describe_probe(pa)}, {run.name} has "
                              f"{_describe_probe(pb)}; rerun with the same --task/--probe-data/--probe-train/--probe-test")
        sa, sb = set(a["options"].get("analyses") or []), set(b["options"].get("analyses") or [])
        for x, y, have, lack in ((first, run, sa, sb), (run, first, sb, sa)):
            for analysis in sorted(have - lack):
                # early exit needs an output (decoder or LM head): a model without one cannot run it
                if analysis == "early-exit" and y.model.get("output") is None:
                    continue
                raise ConfigError(f"--compare: {x.name} ran the {analysis} analysis, {y.name} did not; rerun it "
                                  "with the same --analyses")
    notes = []
    for what, values in (("seed", [r.data["options"].get("seed") for r in runs]),
                         ("precision", [r.model.get("dtype") for r in runs]),
                         ("the proteins sampled for the skip analysis (--skip-proteins; none = all)",
                          [r.data["options"].get("skip_proteins") for r in runs])):
        if len(set(map(str, values))) > 1:
            notes.append(f"The runs differ in {what}: " + ", ".join(f"{r.label or r.path} {v}" for r, v in
                                                                    zip(runs, values)) + ".")
    return notes


# --- the table ---------------------------------------------------------------------------------------------------
def _mean(series: dict | None, i: int):
    if series is None:
        return None
    v = series["mean"][i]
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def stack_rows(run: DepthRun, stack: str) -> list[dict]:
    """One row per analysed layer of ``stack`` (0..N), every measure the run has for it (None where it has none).
    Records in ``run.missing`` why a drawn measure is absent for the whole stack (encoder only)."""
    rep = run.data.get(stack)
    if rep is None:
        return []
    n = rep["n_layers"]
    rows: dict[int, dict] = {}

    def put(layer: int, column: str, value) -> None:
        row = rows.setdefault(layer, {c: None for c in COLUMNS} | {
            "model": run.label, "objective": run.objective, "random_init": bool(run.model.get("random_init")),
            "stack": stack, "layer": layer, "n_layers": n, "relative_depth": layer / n})
        row[column] = value

    why: dict[str, str] = {}
    co = rep.get("contribution")
    if co is not None:
        for i, l in enumerate(co["layers"]):
            put(l, "layer_rel", _mean(co["layer_rel"], i))
    else:
        why["layer_rel"] = "contribution not run"
    sk = rep.get("skip")
    if sk is not None and sk.get("output_kl") is not None:
        for i, l in enumerate(sk["skipped"]):
            put(l, "skip_kl", _mean(sk["output_kl"], i))
            put(l, "skip_top1", _mean(sk["output_top1_agreement"], i))
    else:
        why["skip_kl"] = why["skip_top1"] = "skip not run" if sk is None else "no output head (encoder-only)"
    ee = rep.get("early_exit")
    if ee is not None:
        for i, l in enumerate(ee["layers"]):
            put(l, "early_exit_top1", _mean(ee["top1_agreement"], i))
            put(l, "early_exit_kl", _mean(ee["kl"], i))
    else:
        why["early_exit_top1"] = ("no output head (encoder-only)" if run.model.get("output") is None
                                  else "early-exit not run")
    sim = rep.get("similarity")
    if sim is not None and sim["layers"] and sim["layers"][-1] == n:
        for i, l in enumerate(sim["layers"]):
            v = sim["cka"][i][-1]
            put(l, "cka_final", v if v is None or math.isfinite(v) else None)
    else:
        why["cka_final"] = "cka not run" if sim is None else f"the final layer {n} was not among the analysed layers"
    pr = rep.get("probe")
    if pr is not None:
        for l, s in zip(pr["layers"], pr["score"]):
            put(l, "probe", s)
    else:
        why["probe"] = "probe not run"
    if stack == "encoder":
        run.missing = why
    return [rows[l] for l in sorted(rows)]


def _label_runs(runs: list[DepthRun], labels: list[str] | None) -> None:
    if labels is not None:
        if len(labels) != len(runs):
            raise ConfigError(f"--labels: {len(labels)} labels for {len(runs)} runs (give one per run)")
        names = list(labels)
    else:
        names = [model_name(str(r.model["source"])) for r in runs]
    for i, r in enumerate(runs):
        # two runs of one model (say, two seeds) are told apart by their directories
        r.label = names[i] if names.count(names[i]) == 1 or labels else f"{names[i]} [{os.path.basename(r.path)}]"
    if len({r.label for r in runs}) < len(runs):
        raise ConfigError("--compare: two runs have the same label; give --labels")


@dataclass
class Comparison:
    runs: list[DepthRun]
    rows: list[dict]  # every stack's rows, run by run
    notes: list[str]  # harmless differences

    def to_json_dict(self) -> dict:
        return {
            "runs": [{"label": r.label, "run_dir": r.path, "source": r.model["source"], "family": r.model.get("family"),
                      "kind": r.model["kind"], "objective": r.objective, "random_init": bool(r.model.get("random_init")),
                      "d_model": r.model.get("d_model"), "encoder_layers": r.data["encoder"]["n_layers"],
                      "decoder_layers": (r.data.get("decoder") or {}).get("n_layers"),
                      "dtype": r.model.get("dtype"), "seed": r.data["options"].get("seed"),
                      "missing": r.missing} for r in self.runs],
            "input": {k: self.runs[0].data["inputs"].get(k) for k in ("path", "n_proteins", "n_residues")},
            "measures": {m: what for m, _, what in MEASURES} | {
                "early_exit_kl": "KL(full || exit at layer l), nats (early_exit.kl)"},
            "notes": self.notes,
            "rows": self.rows,
        }


def compare_runs(run_dirs: list[str], labels: list[str] | None = None) -> Comparison:
    """Read and check the runs, and build the table behind the figure."""
    if not run_dirs:
        raise ConfigError("--compare needs at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    _label_runs(runs, labels)
    notes = check_comparable(runs)
    rows = [row for r in runs for stack in ("encoder", "decoder") for row in stack_rows(r, stack)]
    return Comparison(runs, rows, notes)


# --- writing -----------------------------------------------------------------------------------------------------
def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def skip_sample_sizes(cmp: Comparison) -> tuple[int, list[int]]:
    """(proteins analysed, proteins each run's skip measures average over); runs written before
    ``--skip-proteins`` skipped every protein."""
    n_all = cmp.runs[0].data["inputs"].get("n_proteins")
    return n_all, [r.data["inputs"].get("skip_proteins", n_all) for r in cmp.runs]


def _skip_sentence(cmp: Comparison) -> str:
    n_all, counts = skip_sample_sizes(cmp)
    if all(k == n_all for k in counts):
        return ""
    if len(set(counts)) == 1:
        return (f" The skip measures average over a seeded sample of {counts[0]} of the proteins "
                "(`--skip-proteins`), the same for every model.")
    return " The skip measures average over samples of " + ", ".join(
        f"{r.label} {k}" for r, k in zip(cmp.runs, counts)) + " proteins (`--skip-proteins`)."


def markdown(cmp: Comparison, figure: str | None) -> str:
    first = cmp.runs[0].data
    inp, opt = first["inputs"], first["options"]
    lines = ["# Depth across models", "",
             f"{len(cmp.runs)} model{'s' if len(cmp.runs) > 1 else ''} analysed on the same {inp.get('n_proteins')} "
             f"proteins ({inp.get('n_residues')} "
             f"residues, cropped to {opt.get('max_length')}) from `{inp.get('path')}`, mask rate "
             f"{opt.get('mask_rate')}. Layer l of an N-block stack is drawn at relative depth l/N; the curves read "
             "each model's encoder stack (a masked or causal LM's only stack; T5's decoder rows are in "
             "compare.csv)." + _skip_sentence(cmp), "",
             "| model | objective | weights | source | layers | d_model | precision | analysis time | measures missing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in cmp.runs:
        missing = "; ".join(f"{m}: {why}" for m, why in r.missing.items()) or "none"
        layers = str(r.data["encoder"]["n_layers"]) + (f" + {r.data['decoder']['n_layers']} decoder"
                                                       if r.data.get("decoder") else "")
        lines.append(f"| {r.label} | {r.objective} | {'random init' if r.model.get('random_init') else 'trained'} "
                     f"| `{r.model['source']}` | {layers} | {r.model.get('d_model')} | {r.model.get('dtype')} | "
                     f"{(r.data.get('timing') or {}).get('total', math.nan):.0f} s | {missing} |")
    lines.append("")
    if any(r.model.get("random_init") for r in cmp.runs):
        lines += ["A random-init model's curves describe its architecture at initialisation, not what its "
                  "objective taught it.", ""]
    lines += cmp.notes + ([""] if cmp.notes else [])
    # the reading in numbers: where each measure stands at the last quarter of depth
    lines += ["## At a glance", "", "Mean over the encoder layers in the last quarter of depth (l/N > 0.75):", "",
              "| model | " + " | ".join(m for m, _, _ in MEASURES) + " |", "|---|" + "---|" * len(MEASURES)]
    for r in cmp.runs:
        tail = [row for row in cmp.rows if row["model"] == r.label and row["stack"] == "encoder"
                and row["relative_depth"] > 0.75]
        cells = []
        for m, _, _ in MEASURES:
            vals = [row[m] for row in tail if row[m] is not None]
            cells.append(_fmt(sum(vals) / len(vals)) if vals else "–")
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += ["", "Measures: " + "; ".join(f"`{m}`: {what}" for m, _, what in MEASURES) + ".", ""]
    if figure:
        lines += [f"![depth across models]({figure})", ""]
    return "\n".join(lines)


def write_comparison(cmp: Comparison, out_dir: str) -> dict[str, str]:
    """Write compare.png, compare.csv, compare.json and compare.md into ``out_dir``; returns name -> path."""
    from protlm.analysis.plots import plot_compare

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    fig = plot_compare(cmp, os.path.join(out_dir, "compare.png"))
    if fig:
        written["figure"] = fig
    written["csv"] = os.path.join(out_dir, "compare.csv")
    atomic_write_text(written["csv"], _csv(cmp.rows))
    written["json"] = os.path.join(out_dir, "compare.json")
    atomic_write_text(written["json"], json.dumps(cmp.to_json_dict(), indent=1) + "\n")
    written["markdown"] = os.path.join(out_dir, "compare.md")
    atomic_write_text(written["markdown"], markdown(cmp, os.path.basename(fig) if fig else None))
    return written
