"""Stages 2 and 3: embed the evaluation proteins, then train Ankh3's ConvBERT heads (seeds 7, 0, 42) on them
for three columns: one-hot, the random-init twin of the pretrained model, and the pretrained model.

Both stages go through :mod:`protlm.evaluate`: stage 2 fills the evaluation's embedding cache
(``DIR/embeddings``), stage 3 runs the suite, which finds every embedding cached and resumes finished heads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from protlm.evaluate import ModelSource, OneHotSource, Suite, run_suite, write_report
from protlm.evaluate.datasets import LabelledRecord, load_dataset
from protlm.evaluate.runner import build_task_data

VERDICT_TASK = "SSP-3"


def model_sources(final_dir: str, cache_dir: str, threads: int | None, device: str) -> list[ModelSource]:
    """The random-init twin (same architecture, seed 0) and the pretrained model, in report order."""
    common = dict(cache_dir=cache_dir, device=device, threads=threads)
    return [ModelSource(final_dir, random_init_of=final_dir, name="random-init twin", **common),
            ModelSource(final_dir, name="pretrained", **common)]


def evaluation_records(suite: Suite, quick: bool) -> dict[str, list[LabelledRecord]]:
    """Every protein the suite's tasks will look up, by dataset (the quick profile's subsets when quick)."""
    loaded: dict[str, dict[str, list[LabelledRecord]]] = {}
    out: dict[str, dict[str, LabelledRecord]] = {}
    for task in suite.tasks:
        for ds in task.datasets():
            if ds not in loaded:
                spec = suite.datasets[ds]
                loaded[ds] = load_dataset(ds, spec.format, spec.files)
        data = build_task_data(suite, task, loaded, quick)
        for (ds, rid), rec in data.records.items():
            out.setdefault(ds, {})[rid] = rec
    return {ds: list(recs.values()) for ds, recs in sorted(out.items())}


def run_embedding(suite: Suite, sources: list[ModelSource], quick: bool, progress: bool, log) -> dict[str, int]:
    """Per-residue embeddings of every evaluation protein, for each model column; returns proteins per dataset."""
    records = evaluation_records(suite, quick)
    for source in sources:
        for ds, recs in records.items():
            log(f"{source.name}: {ds} ({len(recs)} proteins)")
            prepared = source.prepare(ds, recs, progress=progress)
            close = getattr(prepared.arrays, "close", None)
            if close is not None:
                close()
    return {ds: len(recs) for ds, recs in records.items()}


def run_evaluation(suite: Suite, sources: list[ModelSource], out_dir: str, quick: bool, device: str, progress: bool,
                   log) -> str:
    """Run the suite into ``out_dir`` (resumable per head); returns the path of its results.json."""
    run_suite(suite, [OneHotSource(), *sources], out_dir, quick=quick, device=device, progress=progress,
              log=log, write_report=write_report)
    return os.path.join(out_dir, "results.json")


def export_heads(evaluate_dir: str, heads_dir: str, source: ModelSource, log) -> list[str]:
    """Copy the pretrained model's head bundles (the best seed of each task) from the evaluation to
    ``heads_dir/<task>/``: the demo's starter set for ``protlm predict``. Returns the tasks copied."""
    from protlm.evaluate.bundle import META_FILE, copy_bundle

    src = os.path.join(evaluate_dir, "heads", source.key)
    tasks = sorted(t for t in os.listdir(src) if os.path.isfile(os.path.join(src, t, META_FILE))) if os.path.isdir(src) else []
    for task in tasks:
        copy_bundle(os.path.join(src, task), os.path.join(heads_dir, task))
    if not tasks:
        log(f"no head bundles under {src} (an evaluation finished before protlm kept heads); delete "
            f"{os.path.join(evaluate_dir, 'units')} and re-run to train them")
    return tasks


@dataclass
class Verdict:
    """Whether the pretrained model beats its random-init twin on a task, computed from the results file."""

    task: str
    metric: str = ""
    per_test: dict[str, tuple[float, float]] = field(default_factory=dict)  # test set -> (pretrained, twin) means
    pretrained_mean: float = math.nan  # over test sets of the per-test means over seeds
    twin_mean: float = math.nan
    wins: int = 0  # test sets where the pretrained model's mean is higher

    @property
    def beats(self) -> bool:
        return bool(self.per_test) and self.pretrained_mean > self.twin_mean

    def sentence(self) -> str:
        if not self.per_test:
            return f"No {self.task} results were found, so there is no verdict."
        diff = 100 * (self.pretrained_mean - self.twin_mean)
        word = "BEATS" if self.beats else "does NOT beat"
        return (f"On {self.task}, the pretrained model {word} its random-init twin: mean {self.metric} over the "
                f"{len(self.per_test)} test sets {100 * self.pretrained_mean:.2f} vs {100 * self.twin_mean:.2f} "
                f"({diff:+.2f} points; higher on {self.wins} of {len(self.per_test)} test sets).")


def verdict(results_path: str, pretrained: str = "pretrained", twin: str = "random-init twin",
            task: str = VERDICT_TASK) -> Verdict:
    with open(results_path, encoding="utf-8") as fh:
        rows = json.load(fh)["results"]
    means: dict[tuple[str, str], float] = {}
    v = Verdict(task)
    for r in rows:
        if r["task"] == task and r.get("mean") is not None and not math.isnan(float(r["mean"])):
            means[(r["source"], r["dataset"])] = float(r["mean"])
            v.metric = r["metric"]
    for (source, test), value in sorted(means.items()):
        if source == pretrained and (twin, test) in means:
            v.per_test[test] = (value, means[(twin, test)])
    if v.per_test:
        v.pretrained_mean = float(np.mean([p for p, _ in v.per_test.values()]))
        v.twin_mean = float(np.mean([t for _, t in v.per_test.values()]))
        v.wins = sum(p > t for p, t in v.per_test.values())
    return v
