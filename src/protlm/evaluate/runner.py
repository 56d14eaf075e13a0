"""Running a suite: every (source, task, seed) trains one head; finished units are files, so a run resumes.

Output directory layout::

    OUT/suite.yaml                             the resolved suite (after --set), with the run's options
    OUT/units/<source key>/<task>/seed<S>.json         one trained head (standard protocol)
    OUT/units/<source key>/<task>/seed<S>.fold<K>.json one fold (leave-one-out)
    OUT/units/<source key>/<task>/seed<S>.head/        the unit's head bundle (standard protocol)
    OUT/units/<source key>/<task>/seed<S>.partial.pt   a fine-tuning unit's state after its last epoch (resume)
    OUT/heads/<source key>/<task>/                     the best seed's bundle by validation (or seed<S>/ each)
    OUT/report.md, OUT/results.csv, OUT/results.json  rewritten after every task

A unit file holds a hash of everything that decides its result (task, settings, source, seed, fold, the ids in
each split). On a re-run, units whose file exists with the same hash are read back instead of trained; a unit
whose settings changed is trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import yaml

from protlm.errors import ConfigError, InputError
from protlm.evaluate import bundle as B
from protlm.evaluate.datasets import LabelledRecord, load_dataset
from protlm.evaluate.embeddings import FeatureSource, gather_features
from protlm.evaluate.metrics import mean_std
from protlm.evaluate.pool import UnitPool
from protlm.evaluate.suite import Suite, table4_differences
from protlm.evaluate.tasks import TaskExample, TaskSpec, holdout, resolve_split, subsample
from protlm.evaluate.training import RunResult, HeadTrainConfig, train_head
from protlm.utils import atomic_write_text


@dataclass
class Fold:
    """One training run's data: the standard protocol has one fold, leave-one-out one per record."""

    index: int | None
    train: list[TaskExample]
    valid: list[TaskExample]
    tests: dict[str, list[TaskExample]]


@dataclass
class TaskData:
    task: TaskSpec
    folds: list[Fold]
    records: dict[tuple[str, str], LabelledRecord]  # (dataset, id) -> record, for embedding
    splits: dict[str, list[TaskExample]]  # every split the task uses, by role ("train", "valid", "test:<name>")


@dataclass
class Cell:
    """One (source, task) result: per test set and metric, the value of every seed."""

    source: str  # source name (report column)
    source_key: str
    task: str
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # test -> metric -> per seed
    seeds: list[int] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    train_seconds: float = 0.0  # summed over units, including units finished by earlier runs
    train_cpu_seconds: float = 0.0  # the same in CPU time (not inflated by other jobs on the machine)
    embed_seconds: float = 0.0  # embedding done by this run
    embed_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0  # wall-clock of this (source, task) in this run
    resumed_units: int = 0
    trained_units: int = 0
    missing: dict[str, list[int]] = field(default_factory=dict)  # split -> [missing, total]
    n: dict[str, int] = field(default_factory=dict)  # proteins per split
    # test -> seed -> per-protein rows (training.per_protein_rows; folds concatenated); empty for unit files
    # written before per-protein rows were saved
    per_protein: dict[str, dict[int, list[dict]]] = field(default_factory=dict)


@dataclass
class SuiteRun:
    suite: Suite
    sources: list[FeatureSource]
    quick: bool
    cells: list[Cell] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why (data not reachable)
    deviations: dict[str, list[str]] = field(default_factory=dict)  # task -> list
    settings: dict[str, dict] = field(default_factory=dict)  # task -> effective training settings
    started: float = field(default_factory=time.time)
    seconds: float = 0.0


def _ids_hash(examples: list[TaskExample]) -> str:
    return hashlib.sha1("\n".join(f"{e.dataset}/{e.id}" for e in examples).encode()).hexdigest()[:16]


def build_task_data(suite: Suite, task: TaskSpec, loaded: dict[str, dict[str, list[LabelledRecord]]], quick: bool) -> TaskData:
    """Encode the task's records and cut them into folds (quick profile: fixed subsets)."""
    files = {name: ds.files for name, ds in suite.datasets.items()}
    records: dict[tuple[str, str], LabelledRecord] = {}

    def examples(ref: str) -> list[TaskExample]:
        ds = ref.partition("/")[0]
        out = []
        for rec in resolve_split(ref, loaded, task.name, files):
            ex = task.encode(rec, ds)
            if ex is not None:
                out.append(ex)
                records[(ds, rec.id)] = rec
        if not out:
            raise InputError(f"{', '.join(files[ds].values())}: no usable records for task {task.name!r} in {ref!r}")
        return out

    q = suite.quick if quick else None
    if task.protocol == "leave_one_out":
        pool = examples(task.data)
        n = len(pool)
        if n < task.loo_valid + 2:
            raise InputError(f"task {task.name!r}: leave-one-out needs at least {task.loo_valid + 2} records, got {n}")
        folds = []
        for k in range(n):
            valid_idx = {(k + 1 + j) % n for j in range(task.loo_valid)}
            folds.append(Fold(k, [e for i, e in enumerate(pool) if i != k and i not in valid_idx],
                              [pool[i] for i in sorted(valid_idx)], {task.test_name or "test": [pool[k]]}))
        if q and q.max_folds:
            folds = folds[: q.max_folds]
        return TaskData(task, folds, records, {"all": pool})
    train = examples(task.train)
    if isinstance(task.valid, dict):
        train, valid = holdout(train, float(task.valid["holdout"]))
    else:
        valid = examples(task.valid)
    tests = {name: examples(ref) for name, ref in task.test.items()}
    if q:
        train = subsample(train, q.max_train)
        valid = subsample(valid, q.max_valid)
        tests = {k: subsample(v, q.max_test) for k, v in tests.items()}
    used = {(e.dataset, e.id) for exs in [train, valid, *tests.values()] for e in exs}
    records = {k: v for k, v in records.items() if k in used}
    splits = {"train": train, "valid": valid, **{f"test:{k}": v for k, v in tests.items()}}
    return TaskData(task, [Fold(None, train, valid, tests)], records, splits)


KEEP_HEADS = ("best", "all")


def unit_path(out_dir: str, source: FeatureSource, task: str, seed: int, fold: int | None) -> str:
    name = f"seed{seed}" + (f".fold{fold}" if fold is not None else "") + ".json"
    return os.path.join(out_dir, "units", source.key, _safe_name(task), name)


def unit_hash(suite: Suite, task: TaskSpec, cfg: HeadTrainConfig, source: FeatureSource, seed: int, fold: Fold) -> str:
    blob = json.dumps({
        "task": dataclasses.asdict(task), "training": dataclasses.asdict(cfg), "head": dataclasses.asdict(suite.head),
        "source": source.describe(), "seed": seed, "fold": fold.index,
        "train": _ids_hash(fold.train), "valid": _ids_hash(fold.valid),
        "tests": {k: _ids_hash(v) for k, v in fold.tests.items()},
    }, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def run_suite(
    suite: Suite,
    sources: list[FeatureSource],
    out_dir: str,
    quick: bool = False,
    tasks: list[str] | None = None,
    allow_missing: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    write_report: Callable[[SuiteRun, str], None] | None = None,
    jobs: int = 1,
    job_threads: int = 1,
    keep_heads: str = "best",
) -> SuiteRun:
    """Train and score every (source, task, seed); write unit files and (via ``write_report``) the report.

    ``jobs`` > 1 trains that many units at once, each in its own process with ``job_threads`` torch threads (see
    :class:`UnitPool`); the results are the same as with ``jobs=1`` and ``job_threads`` threads.
    ``keep_heads`` "best" keeps the head bundle of the best seed by validation of each (source, task) under
    ``OUT/heads/<source key>/<task>/``, "all" every seed's under ``.../seed<S>/``.
    """
    if keep_heads not in KEEP_HEADS:
        raise ConfigError(f"--keep-heads must be one of {', '.join(KEEP_HEADS)}, got {keep_heads!r}")
    os.makedirs(out_dir, exist_ok=True)
    selected = [suite.task(t) for t in tasks] if tasks else list(suite.tasks)
    seeds = (suite.quick.seeds if quick and suite.quick.seeds else None) or suite.seeds
    run = SuiteRun(suite, sources, quick)
    atomic_write_text(os.path.join(out_dir, "suite.yaml"), yaml.safe_dump(
        {**suite.raw, "run": {"quick": quick, "tasks": [t.name for t in selected], "seeds": seeds,
                              "sources": [s.describe() for s in sources], "device": device,
                              "allow_missing": allow_missing}}, sort_keys=False))
    loaded: dict[str, dict[str, list[LabelledRecord]]] = {}
    t_start = time.perf_counter()
    if jobs > 1 and not str(device).startswith("cpu"):
        raise ConfigError(f"--jobs {jobs} forks CPU processes, and a forked process cannot use {device}; "
                          "on a GPU train the heads with --jobs 1")
    pool = UnitPool(jobs, job_threads, log) if jobs > 1 else None
    pending: list[_PendingCell] = []

    def finish(block: bool) -> None:
        """Turn cells whose units are all written into results (all of them when ``block``), in start order."""
        if pool is not None:
            pool.wait_all() if block else pool.poll()
        while pending and (block or pool is None or not pool.running_any(p for *_, p, _, _ in pending[0].plan)):
            done = pending.pop(0)
            run.cells.append(_finish_cell(done, log))
            _keep_heads(done, out_dir, keep_heads, log)
            if write_report is not None:
                run.seconds = time.perf_counter() - t_start
                write_report(run, out_dir)

    try:
        ready = []
        for task in selected:
            cfg = suite.train_config(task, quick)
            run.settings[task.name] = {k: v for k, v in dataclasses.asdict(cfg).items()}
            run.deviations[task.name] = list(task.deviations) + [f"training: {d}" for d in table4_differences(cfg, suite.head)]
            absent = []
            for ds in task.datasets():
                spec = suite.datasets[ds]
                missing_files = spec.missing_files()
                if missing_files:
                    if not spec.unavailable:
                        raise InputError(f"{missing_files[0]}: no such file (dataset {ds!r}, task {task.name!r})")
                    absent.append(f"{ds}: {spec.unavailable}")
            if absent:
                run.skipped[task.name] = "; ".join(absent)
                log(f"[{task.name}] skipped: {run.skipped[task.name]}")
                continue
            for ds in task.datasets():
                if ds not in loaded:
                    spec = suite.datasets[ds]
                    loaded[ds] = load_dataset(ds, spec.format, spec.files)
            ready.append((task, cfg, build_task_data(suite, task, loaded, quick)))
        if pool is not None:
            # Longest units first, so that the short ones fill the gaps at the end (LPT scheduling).
            ready.sort(key=lambda r: -unit_cost(r[0], r[1], r[2]))
        for task, cfg, data in ready:
            for source in sources:
                pending.append(_start_cell(suite, task, data, cfg, source, seeds, out_dir, allow_missing, device,
                                           progress, log, pool))
                finish(block=False)
        finish(block=True)
    finally:
        if pool is not None:
            pool.close()
    order = {t.name: i for i, t in enumerate(selected)}
    run.cells.sort(key=lambda c: order[c.task])  # suite order, whatever order the units ran in
    run.seconds = time.perf_counter() - t_start
    if write_report is not None:
        write_report(run, out_dir)
    return run


def unit_cost(task: TaskSpec, cfg: HeadTrainConfig, data: TaskData) -> float:
    """A rough relative training cost of one unit of ``task``: residues trained per unit, with attention's
    quadratic term, and contact pair features weighted as measured (a contact residue costs ~8x)."""
    per_fold = [sum(e.seen + e.seen**2 / 256 for e in fold.train) for fold in data.folds] or [0.0]
    return cfg.epochs * (sum(per_fold) / len(per_fold)) * (8 if task.kind == "contact" else 1)


@dataclass
class _PendingCell:
    cell: Cell
    task: TaskSpec
    data: TaskData
    plan: list[tuple[int, Fold, str, str, dict | None]]  # seed, fold, unit path, unit hash, unit (None: training)
    started: float


def _start_cell(suite: Suite, task: TaskSpec, data: TaskData, cfg: HeadTrainConfig, source: FeatureSource, seeds: list[int],
                out_dir: str, allow_missing: bool, device: str, progress: bool, log,
                pool: "UnitPool | None") -> _PendingCell:
    """Embed what the (source, task) needs and train its missing units, or hand them to ``pool``."""
    t0 = time.perf_counter()
    cell = Cell(source.name, source.key, task.name, seeds=list(seeds))
    # Which units still need training? Only then are embeddings needed at all.
    plan = []
    for seed in seeds:
        for fold in data.folds:
            path = unit_path(out_dir, source, task.name, seed, fold.index)
            h = unit_hash(suite, task, cfg, source, seed, fold)
            plan.append((seed, fold, path, h, _read_unit(path, h)))
    cell.resumed_units = sum(done is not None for *_, done in plan)
    if all(done is not None for *_, done in plan):
        return _PendingCell(cell, task, data, plan, t0)
    if getattr(source, "mode", None) in ("lora", "full"):  # the backbone trains with each head: no embeddings
        log(f"[{task.name}] {source.name}: fine-tuning on {len(data.records)} proteins")
        features = source.features({k: r.sequence for k, r in data.records.items()}, device)
        dropped: set[int] = set()
    else:
        by_ds: dict[str, list[LabelledRecord]] = {}
        for (ds, _), rec in data.records.items():
            by_ds.setdefault(ds, []).append(rec)
        stores = {}
        for ds, recs in sorted(by_ds.items()):
            log(f"[{task.name}] {source.name}: features for {ds} ({len(recs)} proteins)")
            prepared = source.prepare(ds, recs, progress=progress)
            cell.embed_seconds += prepared.seconds
            cell.embed_cpu_seconds += prepared.cpu_seconds
            stores[ds] = prepared
        features, cell.missing, kept = gather_features(stores, data.splits, task.name, allow_missing)
        dropped = {id(e) for exs in data.splits.values() for e in exs} - {id(e) for exs in kept.values() for e in exs}
    for k, (seed, fold, path, h, done) in enumerate(plan):
        if done is not None:
            continue
        f = Fold(fold.index, [e for e in fold.train if id(e) not in dropped],
                 [e for e in fold.valid if id(e) not in dropped],
                 {n: [e for e in v if id(e) not in dropped] for n, v in fold.tests.items()})
        if not f.tests or not any(f.tests.values()) or not f.train or not f.valid:
            continue  # a leave-one-out fold whose protein had no embedding
        label = f"{source.name} | {task.name} | seed {seed}" + (f" | fold {fold.index + 1}/{len(data.folds)}" if fold.index is not None else "")
        unit = dict(task=task, fold=f, features=features, cfg=cfg, suite=suite, seed=seed, device=device,
                    path=path, h=h, source=source, missing=cell.missing, label=label)
        if pool is None:
            plan[k] = (seed, fold, path, h, _train_and_write(progress=progress, **unit))
        else:  # the unit process writes the file; _finish_cell reads it
            pool.submit(label, path, lambda unit=unit: _train_and_write(progress=False, **unit))
        cell.trained_units += 1
    for prepared in getattr(features, "stores", {}).values():
        close = getattr(prepared.arrays, "close", None)
        if close is not None:
            close()  # a forked unit process keeps its own handle
    return _PendingCell(cell, task, data, plan, t0)


def _finish_cell(p: _PendingCell, log) -> Cell:
    """Collect the units of one (source, task) into per-seed values."""
    cell, seeds = p.cell, p.cell.seeds
    per_seed: dict[str, dict[str, dict[int, list]]] = {}  # test -> metric -> seed -> values (one per fold)
    for seed, fold, path, h, done in p.plan:
        if done is None:
            done = _read_unit(path, h)  # written by a unit process
            if done is None:
                continue  # a leave-one-out fold whose protein had no embedding
        res = done["result"]
        cell.train_seconds += float(res.get("seconds", 0.0))
        cell.train_cpu_seconds += float(res.get("cpu_seconds", 0.0))
        cell.best_epochs.append(int(res.get("best_epoch", 0)))
        cell.missing = cell.missing or done.get("missing") or {}
        for test_name, rows in (res.get("per_protein") or {}).items():
            cell.per_protein.setdefault(test_name, {}).setdefault(seed, []).extend(rows)
        for test_name, metrics in res["test"].items():
            for metric, value in metrics.items():
                per_seed.setdefault(test_name, {}).setdefault(metric, {}).setdefault(seed, []).append(value)
    # One value per seed; with leave-one-out, the mean over that seed's folds (i.e. over the test proteins).
    cell.values = {test: {metric: [_nanmean(by_seed.get(s, [])) for s in seeds] for metric, by_seed in metrics.items()}
                   for test, metrics in per_seed.items()}
    cell.n = {k: len(v) for k, v in p.data.splits.items()}
    cell.wall_seconds = time.perf_counter() - p.started
    summary = ", ".join(f"{t} {m} {mean_std(v)[0]:.4f}" for t, ms in cell.values.items() for m, v in ms.items())
    log(f"[{p.task.name}] {cell.source}: {summary} ({cell.trained_units} trained, {cell.resumed_units} resumed, "
        f"{cell.wall_seconds:.0f} s)")
    return cell


def _train_and_write(task, fold: Fold, features, cfg, suite, seed, device, path, h, source, missing, label,
                     progress) -> dict:
    """Train one unit and write its file atomically (its head bundle first); returns what was written."""
    resume = path[: -len(".json")] + ".partial.pt" if getattr(features, "trainable", False) else None
    result = _train_unit(task, fold, features, cfg, suite, seed, device, progress, label, resume, h)
    if fold.index is None:  # leave-one-out folds are many heads of one protein each: nothing to keep
        B.save_bundle(bundle_path(path), result.head, head_meta(task, source, features, suite, result, seed),
                      backbone=backbone_writer(features, result))
    done = {"hash": h, "task": task.name, "source": source.describe(), "seed": seed, "fold": fold.index,
            "result": result.to_dict(), "missing": missing}
    text = json.dumps(done, indent=1, default=_json_default)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, text)
    if resume is not None and os.path.exists(resume):
        os.remove(resume)
    return json.loads(text)  # exactly what a resumed run reads back


def backbone_writer(features, result: RunResult):
    """What a fine-tuned unit's bundle holds besides the head: its adapter or its trained backbone weights."""
    if result.backbone_state is None:
        return None
    return lambda directory: features.save(directory, result.backbone_state)


def bundle_path(unit_file: str) -> str:
    """Where a unit keeps its head bundle: beside its JSON file."""
    return unit_file[: -len(".json")] + ".head"


def head_meta(task: TaskSpec, source: FeatureSource, features, suite: Suite, result: RunResult, seed: int) -> B.HeadMeta:
    """The bundle metadata of a head trained on ``source``'s features: the layer and prefix as resolved in the
    embeddings file the features came from, the backbone as the source names it."""
    attrs: dict = {}
    for prepared in getattr(features, "stores", {}).values():
        attrs = dict(getattr(prepared.arrays, "attrs", None) or {})
        break
    if getattr(features, "trainable", False):  # fine-tuned: the layer and prefix as the backbone resolved them
        attrs = {"layers": [features.layer], "prefix": features.prefix}
    layers = attrs.get("layers")
    layer = getattr(source, "layer", None)
    if layers is not None:
        stored = [int(x) for x in np.atleast_1d(layers)]
        layer = layer if len(stored) > 1 and layer in stored else stored[-1]
    backbone: dict[str, Any] = {"model": "one-hot"} if source.key == "one-hot" else {}
    spec = getattr(source, "random_init_of", None) or getattr(source, "spec", None)
    if spec is not None:
        from protlm.convert import read_config

        config = read_config(spec)[0]
        backbone = {"model": B.model_name(spec), "config_hash": B.config_hash(config),
                    "embed_dtype": source.precision.name, "random_init": bool(source.baseline),
                    "init_seed": source.seed if source.baseline else None,
                    "model_type": config.to_hf_dict()["model_type"], "family": config.protlm_family}
    elif attrs:  # stored embeddings: what their file says
        backbone = {"model": attrs.get("model"), "config_hash": None, "embed_dtype": attrs.get("dtype"),
                    "model_type": attrs.get("model_type"), "family": attrs.get("family")}
    return B.HeadMeta(
        task=task.name, kind=task.kind, classes=list(task.classes) if task.classes else None,
        in_dim=int(features.dim), layer=int(layer) if layer is not None else 0,
        prefix=str(attrs.get("prefix", "none")), head_type="convbert", head_config=dataclasses.asdict(suite.head),
        pooling="mean" if task.kind.startswith("protein_") else "none", max_length=task.max_length,
        target_shift=result.target_shift, target_scale=result.target_scale, backbone=backbone,
        metrics=result.test, valid=result.valid_best, seed=seed, best_epoch=result.best_epoch, source=source.name,
        trained_by="protlm evaluate",
        finetune=features.bundle_entry() if getattr(features, "trainable", False) else None)


def _keep_heads(p: "_PendingCell", out_dir: str, keep: str, log) -> None:
    """Copy the (source, task)'s unit bundles to ``OUT/heads``: the best seed by validation, or every seed."""
    if p.task.protocol != "standard":
        return
    primary = p.task.metrics[0]
    found, lacking = [], []
    for seed, fold, path, h, done in p.plan:
        done = done if done is not None else _read_unit(path, h)
        if done is None:
            continue
        if os.path.exists(os.path.join(bundle_path(path), B.META_FILE)):
            value = (done["result"].get("valid_best") or {}).get(primary)
            found.append((-math.inf if value is None or math.isnan(float(value)) else float(value), seed, path))
        else:
            lacking.append(seed)
    if lacking:
        log(f"[{p.task.name}] {p.cell.source}: no head bundle for seed(s) {', '.join(map(str, lacking))} (trained "
            "before protlm kept heads; delete their unit files under units/ to train them again)")
    if not found:
        return
    target = os.path.join(out_dir, "heads", p.cell.source_key, _safe_name(p.task.name))
    if keep == "all":
        tmp = target + ".all"
        for _, seed, path in found:
            B.copy_bundle(bundle_path(path), os.path.join(tmp, f"seed{seed}"))
        B.copy_bundle(tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # max keeps the first of equal values: a tie goes to the earlier seed of the suite's order
        B.copy_bundle(bundle_path(max(found, key=lambda f: f[0])[2]), target)


def _safe_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)


def _train_unit(task, fold: Fold, features, cfg, suite, seed, device, progress, label, resume=None,
                resume_tag="") -> RunResult:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None, desc=label, unit="step", leave=False, dynamic_ncols=True)

    def report(done: int, total: int, note: str) -> None:
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.set_postfix_str(note, refresh=False)
            bar.refresh()

    try:
        return train_head(task, fold.train, fold.valid, fold.tests, features, features.dim, seed, cfg, suite.head,
                          device, report, resume_file=resume, resume_tag=resume_tag)
    finally:
        if bar is not None:
            bar.close()


def _nanmean(values: list) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else math.nan


def _read_unit(path: str, h: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None  # written atomically, so this is a foreign or damaged file: train the unit again
    return data if data.get("hash") == h else None


def _json_default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def export_fasta(suite: Suite, directory: str, tasks: list[str] | None = None) -> list[tuple[str, int]]:
    """Write ``DIR/<dataset>.fasta`` with every sequence (all splits) under the ids the suite looks up, so that
    any embedder can produce the ``DIR/<dataset>.h5`` files that ``--embeddings DIR`` reads."""
    os.makedirs(directory, exist_ok=True)
    selected = [suite.task(t) for t in tasks] if tasks else suite.tasks
    names = sorted({ds for t in selected for ds in t.datasets()})
    written = []
    for name in names:
        spec = suite.datasets[name]
        if spec.missing_files():
            if spec.unavailable:
                continue
            raise InputError(f"{spec.missing_files()[0]}: no such file (dataset {name!r})")
        seen: dict[str, str] = {}
        for recs in load_dataset(name, spec.format, spec.files).values():
            for r in recs:
                seen.setdefault(r.id, r.sequence)
        path = os.path.join(directory, f"{name}.fasta")
        atomic_write_text(path, "".join(f">{i}\n{s}\n" for i, s in seen.items()))
        written.append((path, len(seen)))
    return written
