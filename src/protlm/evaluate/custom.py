"""Heads on a user's own labels (``protlm train-head``): one labelled file in, tested head bundles out.

Everything but the reading of the file is ``protlm evaluate``'s machinery: labels become numbers through a
:class:`~protlm.evaluate.tasks.TaskSpec`, features come from a :class:`~protlm.evaluate.embeddings.FeatureSource`
(a model's embeddings are computed once and cached as evaluate caches them), heads train with
:func:`~protlm.evaluate.training.train_head`, and bundles are written with :mod:`protlm.evaluate.bundle`. So a
ConvBERT head trained here on a split and seed scores what evaluate's head on that split and seed scores.

A :class:`~protlm.evaluate.embeddings.FinetuneSource` (``--finetune lora|full``) trains the backbone with each
head instead of reading cached embeddings, in the same protocol (split, seeds, epochs, early stopping, class
weights, report); each bundle then carries the backbone's trained part (see :mod:`protlm.finetune`).

Output directory::

    OUT/report.md, OUT/results.json   test metrics per seed, mean ± std, bootstrap 95% intervals over proteins
    OUT/heads/<task>/                 the bundle of the best seed by validation
    OUT/heads/<task>/seed<S>/         every seed's bundle instead, with keep_heads="all"
    OUT/merged/                       with merge=True: the best seed's fine-tuned backbone as a checkpoint
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from protlm.errors import ConfigError, InputError
from protlm.evaluate import bundle as B
from protlm.evaluate.datasets import LabelledRecord
from protlm.evaluate.embeddings import FeatureSource, gather_features
from protlm.evaluate.heads import ConvBertHead, HeadConfig, LightHead, LightHeadConfig
from protlm.evaluate.labels import LABEL, LabelFile
from protlm.evaluate.metrics import mean_std
from protlm.evaluate.tasks import HOLDOUT_SEED, TaskExample, TaskSpec, holdout
from protlm.evaluate.training import HeadTrainConfig, RunResult, bootstrap_interval, train_head
from protlm.finetune.config import FinetuneConfig
from protlm.utils import atomic_write_text

HEADS = ("convbert", "light", "linear")
VALID_HOLDOUT = 0.1  # validation share of train when a file's split has no validation records


@dataclass
class TrainHeadSettings:
    """What ``--set`` edits: ``training.epochs=5``, ``head.num_layers=2``, ``light.hidden=64``,
    ``finetune.lora_rank=4``."""

    training: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)  # the ConvBERT head (--head convbert)
    light: LightHeadConfig = field(default_factory=LightHeadConfig)  # --head light / linear
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # --finetune lora|full: how the backbone trains


@dataclass
class Split:
    train: list[TaskExample]
    valid: list[TaskExample]
    tests: dict[str, list[TaskExample]]
    how: str  # for the report: "from the file" or the random split's fractions and seed


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--split {text!r}: expected three fractions, e.g. 0.8,0.1,0.1") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0 or parts[1] <= 0 or parts[2] <= 0:
        raise ConfigError(f"--split {text!r}: expected three positive fractions (train, validation, test)")
    if abs(sum(parts) - 1) > 1e-6:
        raise ConfigError(f"--split {text!r}: the fractions add up to {sum(parts):g}, not 1")
    return parts  # type: ignore[return-value]


def class_names(labels: LabelFile, records: list[LabelledRecord], declared: list[str] | None) -> list[str] | None:
    """The class list: ``declared`` (in that order), else every class the training records use, sorted."""
    if labels.kind == "protein_regression":
        if declared:
            raise ConfigError("--classes does not apply to a regression task")
        return None
    if declared:
        if len(set(declared)) != len(declared):
            raise ConfigError(f"--classes lists a class twice: {','.join(declared)}")
        return list(declared)
    seen: set[str] = set()
    for r in records:
        seen.update(_used_labels(labels.kind, r))
    return sorted(seen)


def _used_labels(kind: str, rec: LabelledRecord) -> set[str]:
    raw = rec.labels[LABEL]
    if kind == "residue_classification":
        return set(raw) if rec.mask is None else {c for c, k in zip(raw, rec.mask) if k}
    if kind == "protein_multilabel":
        return set(raw)
    return {raw}


def check_known(kind: str, rec: LabelledRecord, classes: list[str], split: str, declared: bool) -> None:
    """A label the head has no class for is an error naming the record (and the residue)."""
    if kind == "protein_regression":
        return
    unknown = sorted(_used_labels(kind, rec) - set(classes))
    if not unknown:
        return
    at = ""
    if kind == "residue_classification":
        pos = next(i for i, c in enumerate(rec.labels[LABEL]) if c == unknown[0] and (rec.mask is None or rec.mask[i]))
        at = f" at residue {pos + 1}"
    where = "is not in --classes" if declared else "never occurs in the training records"
    raise InputError(f"{rec.where}: label {unknown[0]!r}{at} ({split} set) {where} (classes: {', '.join(classes)})"
                     + ("" if declared else "; declare every class with --classes to keep it"))


def encode(task: TaskSpec, rec: LabelledRecord, dataset: str) -> TaskExample:
    if task.kind == "protein_multilabel":
        target = np.isin(np.array(task.classes), list(rec.labels[LABEL]))
        return TaskExample(rec.id, dataset, len(rec.sequence), target, None, rec.where)
    return task.encode(rec, dataset)


def make_split(task: TaskSpec, labels: LabelFile, dataset: str, fractions: tuple[float, float, float] | None,
               split_seed: int, declared: bool) -> Split:
    """Encode the records and cut train / validation / test: the file's sets, or a seeded random split (when
    ``fractions`` is given, or the file has no sets). Labels outside the class list are errors."""
    if fractions is None and labels.has_splits:
        named = {k: v for k, v in labels.splits.items()}
        if "train" not in named or not any(k.startswith("test") for k in named):
            raise InputError(f"{labels.path}: the file's sets are {', '.join(sorted(named))}; train-head needs "
                             "train and test records (or give --split to split all records at random)")
        for name, recs in named.items():
            for r in recs:
                check_known(task.kind, r, task.classes or [], name, declared)
        train = [encode(task, r, dataset) for r in named["train"]]
        how = "the file's sets"
        if "valid" in named:
            valid = [encode(task, r, dataset) for r in named["valid"]]
        else:
            train, valid = holdout(train, VALID_HOLDOUT)
            how += f" (no validation records: a fixed {VALID_HOLDOUT:.0%} of train, seed {HOLDOUT_SEED})"
        tests = {k: [encode(task, r, dataset) for r in v] for k, v in sorted(named.items()) if k.startswith("test")}
        return Split(train, valid, tests, how)
    fractions = fractions or (0.8, 0.1, 0.1)
    records = labels.records()
    order = np.random.default_rng(split_seed).permutation(len(records))
    n_test = max(1, round(fractions[2] * len(records)))
    n_valid = max(1, round(fractions[1] * len(records)))
    if len(records) - n_test - n_valid < 1:
        raise InputError(f"{labels.path}: {len(records)} records are too few for a train/validation/test split")
    parts = {"test": sorted(order[:n_test]), "valid": sorted(order[n_test:n_test + n_valid]),
             "train": sorted(order[n_test + n_valid:])}
    for name, idx in parts.items():
        for i in idx:
            check_known(task.kind, records[i], task.classes or [], name, declared)
    ex = {name: [encode(task, records[i], dataset) for i in idx] for name, idx in parts.items()}
    how = f"random split {fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} (seed {split_seed})"
    return Split(ex["train"], ex["valid"], {"test": ex["test"]}, how)


def class_weights(task: TaskSpec, train: list[TaskExample]) -> torch.Tensor:
    """Weights that make each class count as much as the others: n / (C * n_c) ("balanced"), from the training
    labels; multi-label: each class's negatives / positives (BCE's pos_weight). A class absent from train
    gets weight 1."""
    C = len(task.classes or [])
    if task.kind == "protein_multilabel":
        pos = np.sum([e.target for e in train], axis=0).astype(np.float64)
        neg = len(train) - pos
        return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    if task.kind == "residue_classification":
        ids = np.concatenate([e.target[e.target >= 0] for e in train])
    else:
        ids = np.array([e.target for e in train])
    counts = np.bincount(ids, minlength=C).astype(np.float64)
    return torch.tensor(np.where(counts > 0, counts.sum() / (C * np.maximum(counts, 1)), 1.0), dtype=torch.float32)


def dataset_key(labels: LabelFile) -> str:
    """The embedding cache's dataset name: the file's stem and a hash of its ids and sequences, so an edited
    file never reuses embeddings of other sequences under the same ids."""
    stem = os.path.basename(labels.path).split(".")[0] or "labels"
    h = hashlib.sha1("\n".join(f"{r.id}\t{r.sequence}" for r in labels.records()).encode()).hexdigest()[:10]
    return f"{stem}-{h}"


def head_builder(choice: str, in_dim: int, task: TaskSpec, settings: TrainHeadSettings) -> Callable[[], torch.nn.Module]:
    if choice == "convbert":
        return lambda: ConvBertHead(in_dim, task.kind, task.n_out, settings.head)
    if choice in ("light", "linear"):
        cfg = settings.light if choice == "light" else dataclasses.replace(settings.light, style="linear")
        return lambda: LightHead(in_dim, task.kind, task.n_out, cfg)
    raise ConfigError(f"--head {choice!r}: choose one of {', '.join(HEADS)}")


def run_train_head(
    labels: LabelFile,
    source: FeatureSource,
    out_dir: str,
    *,
    task_name: str = "",
    classes: list[str] | None = None,
    head: str = "convbert",
    seeds: list[int] = (0,),
    fractions: tuple[float, float, float] | None = None,
    split_seed: int = 0,
    use_class_weights: bool = False,
    patience: int | None = None,
    settings: TrainHeadSettings | None = None,
    keep_heads: str = "best",
    device: str = "cpu",
    progress: bool = True,
    allow_missing: bool = False,
    bootstrap: int = 1000,
    merge: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a head per seed on ``labels`` with ``source``'s features, write the report and the bundle(s);
    returns what ``results.json`` holds. With a fine-tuning ``source`` and ``merge``, the best seed's backbone is
    also written as a checkpoint to ``OUT/merged`` (:func:`protlm.evaluate.predict.export_backbone`)."""
    settings = settings or TrainHeadSettings()
    if keep_heads not in ("best", "all"):
        raise ConfigError(f"--keep-heads must be best or all, got {keep_heads!r}")
    if use_class_weights and labels.kind == "protein_regression":
        raise ConfigError("--class-weights applies to classification; this is a regression task")
    if patience is not None and patience < 1:
        raise ConfigError(f"--patience must be >= 1, got {patience}")
    tuned = getattr(source, "mode", None) in ("lora", "full")
    if merge and not tuned:
        raise ConfigError("--merge writes a fine-tuned backbone: it needs --finetune lora or full")
    name = task_name or os.path.basename(labels.path).split(".")[0] or "task"
    t0 = time.perf_counter()
    train_records = labels.splits.get("train") if fractions is None and labels.has_splits else labels.records()
    found = class_names(labels, train_records or [], classes)
    task = TaskSpec(name=name, kind=labels.kind, label=LABEL, train="labels/train", valid="labels/valid",
                    test={"test": "labels/test"}, classes=found)
    dataset = dataset_key(labels)
    split = make_split(task, labels, dataset, fractions, split_seed, declared=bool(classes))
    if task.kind.endswith("classification") and len(found) < 2:  # after make_split: an unseen label says more
        raise InputError(f"{labels.path}: the training records use {len(found)} class ({', '.join(found)}); "
                         "classification needs at least 2")
    roles = {"train": split.train, "valid": split.valid, **{f"test:{k}": v for k, v in split.tests.items()}}
    kind_text = f"{task.kind}, {len(task.classes)} classes" if task.classes else task.kind
    log(f"[{name}] {kind_text}; " + ", ".join(f"{k} {len(v)}" for k, v in roles.items()) + f" ({split.how})")
    used = {e.id for exs in roles.values() for e in exs}
    records = [r for r in labels.records() if r.id in used]
    if tuned:  # the backbone trains with each head: features come from it, never from a cache
        log(f"[{name}] {source.name}: fine-tuning on {len(records)} proteins")
        features = source.features({(dataset, r.id): r.sequence for r in records}, device)
        missing, kept = {}, roles
    else:
        log(f"[{name}] {source.name}: features for {len(records)} proteins")
        prepared = source.prepare(dataset, records, progress=progress)
        features, missing, kept = gather_features({dataset: prepared}, roles, name, allow_missing)
    train, valid = kept["train"], kept["valid"]
    tests = {k.removeprefix("test:"): v for k, v in kept.items() if k.startswith("test:")}
    weights = class_weights(task, train) if use_class_weights else None
    cfg = settings.training
    primary = task.metrics[0]
    results: list[RunResult] = []
    best = 0
    for i, seed in enumerate(seeds):
        res = train_head(task, train, valid, tests, features, features.dim, seed, cfg, settings.head, device,
                         None, make_head=head_builder(head, features.dim, task, settings), class_weights=weights,
                         patience=patience)
        results.append(res)
        if _selection_score(res, primary) > _selection_score(results[best], primary):
            best = i
        if keep_heads == "best":  # one trained backbone in memory (the best so far), not one per seed
            for j, r in enumerate(results):
                if j != best:
                    r.backbone_state = None
        summary = ", ".join(f"{t} {m} {v:.4f}" for t, ms in res.test.items() for m, v in ms.items())
        log(f"[{name}] seed {seed}: best epoch {res.best_epoch}/{len(res.history)}, {summary}")
    from protlm.evaluate.runner import backbone_writer, head_meta

    heads_dir = os.path.join(out_dir, "heads", _safe(name))
    bundles = []
    for i, (seed, res) in enumerate(zip(seeds, results)):
        if keep_heads == "best" and i != best:
            continue
        meta = head_meta(task, source, features, settings, res, seed)
        meta.head_type = B.head_type_of(res.head)
        meta.head_config = dataclasses.asdict(res.head.cfg if isinstance(res.head, LightHead) else settings.head)
        meta.trained_by = "protlm train-head"
        target = heads_dir if keep_heads == "best" else os.path.join(heads_dir, f"seed{seed}")
        B.save_bundle(target, res.head, meta, backbone=backbone_writer(features, res))
        bundles.append(target)
    out = _results(task, source, labels, split, seeds, results, best, missing, bundles, head, cfg, bootstrap,
                   use_class_weights, patience)
    if merge:
        from protlm.evaluate.predict import export_backbone

        best_bundle = heads_dir if keep_heads == "best" else os.path.join(heads_dir, f"seed{seeds[best]}")
        out["merged"] = export_backbone(best_bundle, os.path.join(out_dir, "merged"))
        log(f"[{name}] wrote the fine-tuned backbone of seed {seeds[best]} to {out['merged']}")
    out["seconds"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(_clean(out), indent=1) + "\n")
    atomic_write_text(os.path.join(out_dir, "report.md"), markdown(out))
    return out


def _selection_score(res: RunResult, metric: str) -> float:
    """How seeds compete for the kept bundle: the validation score of their best epoch (NaN last)."""
    value = res.valid_best[metric]
    return -math.inf if math.isnan(value) else value


def _results(task, source, labels, split, seeds, results, best, missing, bundles, head, cfg, resamples,
             use_class_weights, patience) -> dict[str, Any]:
    primary = task.metrics[0]
    tests = []
    for test in results[0].test:
        for metric in task.metrics:
            values = [r.test[test][metric] for r in results]
            mean, std = mean_std(values)
            low, high = bootstrap_interval(task.kind, metric, [r.per_protein[test] for r in results], resamples)
            tests.append({"test": test, "metric": metric, "seeds": list(seeds), "values": values, "mean": mean,
                          "std": std, "ci95": [low, high], "n": len(results[0].per_protein[test])})
    return {
        "task": task.name, "kind": task.kind, "classes": task.classes, "labels": os.path.abspath(labels.path),
        "source": source.describe(), "head": head, "split": split.how,
        "proteins": {"train": len(split.train), "valid": len(split.valid), **{k: len(v) for k, v in split.tests.items()}},
        "missing_embeddings": missing, "left_out_unlabelled": labels.left_out,
        "results": tests, "selection_metric": primary,
        "per_seed": [{"seed": s, "best_epoch": r.best_epoch, "epochs_run": len(r.history), "valid": r.valid_best,
                      "test": r.test, "seconds": r.seconds} for s, r in zip(seeds, results)],
        "best_seed": seeds[best], "bundles": bundles, "training": dataclasses.asdict(cfg),
        "class_weights": use_class_weights, "patience": patience,
        "finetune": source.describe().get("finetune"),
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [f"# {out['task']}: {out['kind'].replace('_', ' ')}", "",
             f"Labels: `{out['labels']}`; features: {out['source']['name']}; head: {out['head']}; "
             f"split: {out['split']}.", "",
             "Test metric x100: mean ± std over head seeds, and a 95% percentile bootstrap interval over test "
             "proteins (of the seeds' mean).", "",
             "| Test set | Metric | Proteins | Mean ± std | 95% interval | Per seed |", "|---|---|---|---|---|---|"]
    for r in out["results"]:
        mean = "n/a" if math.isnan(r["mean"]) else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        lo, hi = r["ci95"]
        ci = "n/a" if math.isnan(lo) else f"{100 * lo:.2f} – {100 * hi:.2f}"
        per = ", ".join(f"{s}: {100 * v:.2f}" if not math.isnan(v) else f"{s}: n/a" for s, v in zip(r["seeds"], r["values"]))
        lines.append(f"| {r['test']} | {r['metric']} | {r['n']} | {mean} | {ci} | {per} |")
    lines += ["", "## Runs", ""]
    for s in out["per_seed"]:
        lines.append(f"- seed {s['seed']}: best epoch {s['best_epoch']} of {s['epochs_run']} run, validation "
                     + ", ".join(f"{k} {v:.4f}" for k, v in s["valid"].items()) + f" ({s['seconds']:.0f} s)")
    t = out["training"]
    lines += ["", f"Proteins: " + ", ".join(f"{k} {v}" for k, v in out["proteins"].items())
              + (f"; {out['left_out_unlabelled']} without a label (SET=pred) left out" if out["left_out_unlabelled"] else ""),
              f"Training: lr {t['lr']}, warmup {t['warmup_steps']}, epochs {t['epochs']}"
              + (f" (early stopping after {out['patience']} epochs without improvement)" if out["patience"] else "")
              + f", batch {t['batch_size']} x accumulation {t['grad_accum']}, {t['precision']}"
              + ("; class-weighted loss" if out["class_weights"] else "") + ".",
              *([_finetune_line(out["finetune"])] if out.get("finetune") else []),
              f"Head bundle(s): " + ", ".join(f"`{b}`" for b in out["bundles"]) + f" (best seed by validation: "
              f"{out['best_seed']})" + (f"; merged backbone: `{out['merged']}`" if out.get("merged") else "")
              + ".", ""]
    return "\n".join(lines)


def _finetune_line(ft: dict[str, Any]) -> str:
    if ft["mode"] == "lora":
        targets = ",".join(ft["lora_targets"]) if ft.get("lora_targets") else "attention" + (
            " and feed-forward" if ft.get("lora_ffn") else "")
        how = (f"rank {ft['lora_rank']}, alpha {ft['lora_alpha']:g}, dropout {ft['lora_dropout']:g}, on the "
               f"{targets} projections, adapter lr {ft['adapter_lr']:g}")
    else:
        frozen = ft.get("freeze_first") or 0
        how = f"backbone lr {ft['backbone_lr']:g}"
        how += f", embeddings and first {frozen} blocks frozen" if frozen else ""
    extra = "; activation checkpointing" if ft.get("checkpointing") else ""
    return f"Backbone: {'LoRA' if ft['mode'] == 'lora' else 'full'} fine-tuning with the head ({how}{extra})."


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
