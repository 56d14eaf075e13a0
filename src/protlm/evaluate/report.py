"""The suite's results as a Table-5-shaped markdown table, a CSV with every seed, and JSON.

Values are printed like the paper's Table 5: everything x100 (accuracy and precision in %, Spearman's rho x100),
as mean ± std over the seeds (sample standard deviation). A task whose data is not reachable stays in the table
as "n/a" with the reason underneath, so the table always has the same rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time

from protlm.evaluate.metrics import mean_std
from protlm.evaluate.runner import SuiteRun
from protlm.evaluate.tasks import TaskSpec
from protlm.utils import atomic_write_text


def metric_label(task: TaskSpec, metric: str) -> str:
    if task.metric_label and metric == task.metrics[0]:
        return task.metric_label
    if metric == "accuracy":
        return f"Q{task.n_out}"
    if metric == "spearman":
        return "Spearman"
    return metric


def _rows(run: SuiteRun) -> list[tuple[TaskSpec, str, str]]:
    """(task, test set, metric) in suite order; skipped tasks keep their rows."""
    out = []
    tasks = [t for t in run.suite.tasks if t.name in run.settings]
    for t in tasks:
        tests = [t.test_name or "test"] if t.protocol == "leave_one_out" else list(t.test)
        for test in tests:
            for m in t.metrics:
                out.append((t, test, m))
    return out


def _fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def markdown(run: SuiteRun) -> str:
    suite = run.suite
    sources = [s.name for s in run.sources]
    cells = {(c.source, c.task): c for c in run.cells}
    seeds = sorted({s for c in run.cells for s in c.seeds}, key=lambda s: (suite.seeds + [s]).index(s))
    lines = [f"# {suite.name}: {'quick' if run.quick else 'full'} profile", ""]
    lines.append(f"Mean ± std over seeds {', '.join(map(str, seeds or suite.seeds))} of the test metric x100 "
                 "(accuracy and precision in %, Spearman's rho x100), as in Ankh3's Table 5.")
    if run.quick:
        lines.append("QUICK PROFILE: subsets and fewer epochs; a smoke test, not a benchmark result.")
    lines += ["", "| Task | Dataset | Metric | " + " | ".join(sources) + " |",
              "|---|---|---|" + "---|" * len(sources)]
    for task, test, metric in _rows(run):
        if task.name in run.skipped:
            vals = ["n/a (data not reachable)"] * len(sources)
        else:
            vals = []
            for s in sources:
                c = cells.get((s, task.name))
                vals.append(_fmt(c.values.get(test, {}).get(metric, [])) if c else "not run")
        lines.append(f"| {task.name} | {test} | {metric_label(task, metric)} | " + " | ".join(vals) + " |")
    lines += ["", "## Time per task", "",
              "Wall-clock of this run for the task (embedding computed in this run + head training); then embedding "
              "and head-training time summed over all seeds and folds (including units finished by an earlier run), "
              "as wall-clock / CPU time of the process. CPU time is what the task costs on an idle machine; "
              "wall-clock also counts waiting for other jobs.", "",
              "| Task | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for task in [t for t in suite.tasks if t.name in run.settings and t.name not in run.skipped]:
        vals = []
        for s in sources:
            c = cells.get((s, task.name))
            if c is None:
                vals.append("not run")
                continue
            vals.append(f"{_fmt_seconds(c.wall_seconds)} (embed {_fmt_seconds(c.embed_seconds)} / "
                        f"{_fmt_seconds(c.embed_cpu_seconds)} cpu, heads {_fmt_seconds(c.train_seconds)} / "
                        f"{_fmt_seconds(c.train_cpu_seconds)} cpu; {c.trained_units} trained, {c.resumed_units} resumed)")
        lines.append(f"| {task.name} | " + " | ".join(vals) + " |")
    lines += ["", f"Total wall-clock of this run: {_fmt_seconds(run.seconds)}."]
    lines += ["", "## Deviations from the paper's protocol", ""]
    any_dev = False
    for task in [t for t in suite.tasks if t.name in run.settings]:
        devs = run.deviations.get(task.name, [])
        if task.name in run.skipped:
            devs = [f"not run: {run.skipped[task.name]}"] + devs
        for d in devs:
            lines.append(f"- **{task.name}**: {d}")
            any_dev = True
    if run.quick:
        q = suite.quick
        lines.append(f"- **all tasks**: quick profile (max {q.max_train} train / {q.max_valid} valid / {q.max_test} "
                     f"test proteins per split, {q.max_folds} leave-one-out folds, training overrides {q.training})")
        any_dev = True
    if not any_dev:
        lines.append("- none")
    missing = [(c.source, c.task, split, m) for c in run.cells for split, m in c.missing.items()]
    if missing:
        lines += ["", "## Proteins left out for lack of embeddings (--allow-missing)", ""]
        for source, task, split, (n, total) in missing:
            lines.append(f"- {source}, {task}, {split}: {n} of {total}")
    lines += ["", "## Data used", "", "| Task | Proteins per split |", "|---|---|"]
    for task in [t for t in suite.tasks if t.name in run.settings and t.name not in run.skipped]:
        c = next((c for c in run.cells if c.task == task.name), None)
        if c:
            lines.append(f"| {task.name} | " + ", ".join(f"{k} {v}" for k, v in c.n.items()) + " |")
    lines += ["", "## Settings", ""]
    for task in [t for t in suite.tasks if t.name in run.settings and t.name not in run.skipped]:
        st = run.settings[task.name]
        lines.append(f"- {task.name}: lr {st['lr']}, warmup {st['warmup_steps']}, epochs {st['epochs']}, "
                     f"batch {st['batch_size']} x accumulation {st['grad_accum']}, weight decay {st['weight_decay']}, "
                     f"{st['precision']}")
    h = suite.head
    lines.append(f"- head: ConvBERT {h.num_layers} layer, ff = {h.ff_ratio} x embedding width, {h.num_heads} heads "
                 f"({h.num_heads // h.head_ratio} self-attention + {h.num_heads - h.num_heads // h.head_ratio} "
                 f"dynamic convolution), dropout {h.dropout}, kernel {h.kernel_size}")
    for s in run.sources:
        lines.append(f"- {s.name}: " + ", ".join(f"{k}={v}" for k, v in s.describe().items() if v is not None and k != "name"))
    return "\n".join(lines) + "\n"


def per_seed_rows(run: SuiteRun) -> list[dict]:
    out = []
    for c in run.cells:
        task = run.suite.task(c.task)
        for test, metrics in c.values.items():
            for metric, values in metrics.items():
                for seed, v in zip(c.seeds, values):
                    out.append({"source": c.source, "source_key": c.source_key, "task": c.task, "dataset": test,
                                "metric": metric_label(task, metric), "seed": seed,
                                "value": None if v is None or math.isnan(v) else v})
    return out


def to_json(run: SuiteRun) -> dict:
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    results = []
    for c in run.cells:
        task = run.suite.task(c.task)
        for test, metrics in c.values.items():
            for metric, values in metrics.items():
                mean, std = mean_std(values)
                results.append({"source": c.source, "task": c.task, "dataset": test,
                                "metric": metric_label(task, metric), "seeds": c.seeds, "values": values,
                                "mean": mean, "std": std})
    return clean({
        "suite": run.suite.name, "profile": "quick" if run.quick else "full",
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sources": [s.describe() for s in run.sources],
        "results": results,
        "timing": [{"source": c.source, "task": c.task, "wall_seconds": c.wall_seconds,
                    "embed_seconds": c.embed_seconds, "train_seconds": c.train_seconds,
                    "embed_cpu_seconds": c.embed_cpu_seconds, "train_cpu_seconds": c.train_cpu_seconds,
                    "trained_units": c.trained_units, "resumed_units": c.resumed_units, "best_epochs": c.best_epochs}
                   for c in run.cells],
        "skipped": run.skipped, "deviations": run.deviations, "settings": run.settings,
        "missing_embeddings": {f"{c.source}/{c.task}": c.missing for c in run.cells if c.missing},
        "proteins": {c.task: c.n for c in run.cells},
        "total_seconds": run.seconds,
    })


def write_report(run: SuiteRun, out_dir: str) -> dict[str, str]:
    paths = {k: os.path.join(out_dir, n) for k, n in
             (("markdown", "report.md"), ("csv", "results.csv"), ("json", "results.json"))}
    atomic_write_text(paths["markdown"], markdown(run))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["source", "source_key", "task", "dataset", "metric", "seed", "value"])
    writer.writeheader()
    writer.writerows(per_seed_rows(run))
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(to_json(run), indent=1))
    return paths
