"""Tasks: what to predict from which records, how to split them and how to score the result.

A task names a label (``ss3``, ``fitness``, ...), its kind (see ``heads.KINDS``), the class list for
classification, and where its train / validation / test records come from. Labels become numbers here, so this
is where an unknown class is caught (with the file and record named).

Split references are ``dataset/split`` (``flip_ss3/train``) or a bare dataset name for a file that has one split.
Validation can instead be ``{holdout: 0.1}``: a fixed 10% of the training records (the same for every seed and
every model) held out for model selection. ``protocol: leave_one_out`` trains one head per record of a small set
(CASP14 contacts): each record is the test set once, the next ``loo_valid`` records (cyclically) are the
validation set and the rest train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from protlm.errors import ConfigError, InputError
from protlm.evaluate.datasets import LabelledRecord
from protlm.evaluate.heads import Kind

Protocol = Literal["standard", "leave_one_out"]
# Metric names each kind can report; the first listed for a task selects the model on validation.
KIND_METRICS = {
    "residue_classification": ("accuracy",),
    "protein_classification": ("accuracy",),
    "protein_regression": ("spearman",),
    "protein_multilabel": ("f1_micro",),
    "contact": tuple(f"{p}{'' if r == 'all' else '-' + r}" for r in ("all", "short", "medium", "long")
                     for p in ("P@L", "P@L/2", "P@L/5")),
}
HOLDOUT_SEED = 0  # fixes which records a holdout validation split takes


@dataclass
class TaskExample:
    """One protein as the trainer sees it; its features come from the embeddings of ``dataset``."""

    id: str
    dataset: str
    length: int
    target: Any  # (L,) int64 class ids, -1 = unscored | int class | float | (L, L) int8 contacts, -1 = unscored
    positions: np.ndarray | None = None  # (L,) residue numbers for contact separation
    where: str = ""
    keep: np.ndarray | None = None  # residue indices the head sees when the protein is cropped (None = all)

    @property
    def seen(self) -> int:
        """Residues the head sees (``length`` unless cropped to the task's ``max_length``)."""
        return self.length if self.keep is None else len(self.keep)


@dataclass
class TaskSpec:
    """One benchmark task, as written in a suite file (``tasks:`` list)."""

    name: str  # row label in the report ("SSP-3")
    kind: Kind
    label: str  # key in LabelledRecord.labels
    train: str = ""  # split reference, e.g. "flip_ss3/train" (standard protocol)
    valid: Any = None  # split reference, or {"holdout": fraction}
    test: dict[str, str] = field(default_factory=dict)  # report name -> split reference
    data: str = ""  # leave_one_out: the split reference holding all records
    protocol: Protocol = "standard"
    loo_valid: int = 2  # leave_one_out: validation records per fold
    test_name: str = ""  # leave_one_out: report name of the pooled test folds
    classes: list[str] | None = None  # classification: label values, in class-id order
    label_map: dict[str, str] = field(default_factory=dict)  # raw label -> class (e.g. DSSP 4's P -> C)
    exclude_labels: list[str] = field(default_factory=list)  # records with these labels are left out (DeepLoc U)
    metrics: list[str] = field(default_factory=list)  # reported metrics; the first selects the model
    min_separation: int = 6  # contacts: pairs closer in sequence are neither trained on nor scored
    training: dict[str, Any] = field(default_factory=dict)  # overrides of the suite's training settings
    deviations: list[str] = field(default_factory=list)  # how this differs from the paper, printed in the report
    metric_label: str = ""  # how the report names the metric ("Q3", "Spearman", ...)
    max_length: int | None = None  # per-protein kinds: longer proteins keep their first and last max_length/2
    #                                residues (DeepLoc's own convention); embeddings still see the whole chain

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.kind.endswith("classification") and not self.classes:
            raise ConfigError(f"{where}: a classification task needs 'classes'")
        if self.protocol == "standard" and (not self.train or self.valid is None or not self.test):
            raise ConfigError(f"{where}: needs train, valid and test")
        if self.protocol == "leave_one_out" and not self.data:
            raise ConfigError(f"{where}: leave_one_out needs 'data'")
        allowed = KIND_METRICS[self.kind]
        self.metrics = list(self.metrics or allowed[:1])
        bad = [m for m in self.metrics if m not in allowed]
        if bad:
            raise ConfigError(f"{where}: metric(s) {', '.join(bad)} do not apply to {self.kind} (use {', '.join(allowed)})")
        if self.max_length is not None and (not self.kind.startswith("protein_") or self.max_length < 2):
            raise ConfigError(f"{where}: max_length applies to per-protein kinds only and must be >= 2")
        if isinstance(self.valid, dict) and set(self.valid) != {"holdout"}:
            raise ConfigError(f"{where}: valid must be a split reference or {{holdout: fraction}}")

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.classes else 1

    def datasets(self) -> list[str]:
        refs = [self.data] if self.protocol == "leave_one_out" else [self.train, *self.test.values()]
        if isinstance(self.valid, str):
            refs.append(self.valid)
        return sorted({split_ref(r)[0] for r in refs})

    # --- labels -> numbers ------------------------------------------------------------------------------------
    def encode(self, rec: LabelledRecord, dataset: str) -> TaskExample | None:
        """The record as an TaskExample, or None when its label is excluded (e.g. membrane 'U')."""
        if self.label not in rec.labels:
            raise InputError(f"{rec.where}: no {self.label!r} labels (this file provides: "
                             f"{', '.join(rec.labels) or 'none'}) for task {self.name!r}")
        raw = rec.labels[self.label]
        L = len(rec.sequence)
        if self.kind == "residue_classification":
            index = {c: i for i, c in enumerate(self.classes)}
            target = np.empty(L, dtype=np.int64)
            for i, c in enumerate(raw):
                c = self.label_map.get(c, c)
                if c not in index:
                    raise InputError(f"{rec.where}: unknown {self.label} class {raw[i]!r} at residue {i + 1} "
                                     f"(task {self.name!r} knows {''.join(self.classes)})")
                target[i] = index[c]
            if rec.mask is not None:
                target[~rec.mask] = -1
            return TaskExample(rec.id, dataset, L, target, None, rec.where)
        keep = None
        if self.max_length is not None and L > self.max_length:
            head = self.max_length // 2
            keep = np.concatenate([np.arange(head), np.arange(L - (self.max_length - head), L)])
        if self.kind == "protein_classification":
            value = self.label_map.get(raw, raw)
            if value in self.exclude_labels:
                return None
            if value not in self.classes:
                raise InputError(f"{rec.where}: unknown {self.label} class {raw!r} (task {self.name!r} knows "
                                 f"{', '.join(self.classes)}{'; excluded: ' + ', '.join(self.exclude_labels) if self.exclude_labels else ''})")
            return TaskExample(rec.id, dataset, L, self.classes.index(value), None, rec.where, keep)
        if self.kind == "protein_regression":
            return TaskExample(rec.id, dataset, L, float(raw), None, rec.where, keep)
        contacts = np.asarray(raw, dtype=np.int8)
        if contacts.shape != (L, L):
            raise InputError(f"{rec.where}: contact map is {contacts.shape}, expected ({L}, {L})")
        pos = rec.positions if rec.positions is not None else np.arange(L)
        contacts = contacts.copy()
        contacts[np.abs(pos[:, None] - pos[None, :]) < self.min_separation] = -1
        if rec.mask is not None:
            contacts[~rec.mask, :] = -1
            contacts[:, ~rec.mask] = -1
        return TaskExample(rec.id, dataset, L, contacts, pos, rec.where)


def split_ref(ref: str) -> tuple[str, str | None]:
    """'dataset/split' -> (dataset, split); 'dataset' -> (dataset, None)."""
    ds, _, split = ref.partition("/")
    return ds, (split or None)


def resolve_split(ref: str, splits: dict[str, dict[str, list[LabelledRecord]]], task: str,
                  files: dict[str, dict[str, str]]) -> list[LabelledRecord]:
    """The records a reference names; a missing or empty split is an error naming the dataset's files."""
    ds, split = split_ref(ref)
    if ds not in splits:
        raise ConfigError(f"task {task!r}: unknown dataset {ds!r} in {ref!r}")
    have = splits[ds]
    if split is None:
        if len(have) != 1:
            raise ConfigError(f"task {task!r}: dataset {ds!r} has splits {', '.join(have)}; write {ds}/<split>")
        split = next(iter(have))
    src = ", ".join(files.get(ds, {}).values()) or ds
    if split not in have:
        raise InputError(f"{src}: no split {split!r} for task {task!r} (dataset {ds!r} has {', '.join(have) or 'none'})")
    if not have[split]:
        raise InputError(f"{src}: split {split!r} is empty (task {task!r}, dataset {ds!r})")
    return have[split]


def holdout(examples: list[TaskExample], fraction: float) -> tuple[list[TaskExample], list[TaskExample]]:
    """(train, valid): a fixed random ``fraction`` of the examples is validation, whatever the seed or model."""
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be between 0 and 1, got {fraction}")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(examples))
    n_valid = max(1, round(fraction * len(examples)))
    valid_idx = set(order[:n_valid].tolist())
    return ([e for i, e in enumerate(examples) if i not in valid_idx], [e for i, e in enumerate(examples) if i in valid_idx])


def subsample(examples: list[TaskExample], limit: int | None) -> list[TaskExample]:
    """At most ``limit`` examples, a fixed random choice in the original order (quick profile)."""
    if limit is None or len(examples) <= limit:
        return examples
    keep = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(examples))[:limit].tolist())
    return [e for i, e in enumerate(examples) if i in keep]
