"""Training one head on frozen embeddings with Ankh3's protocol, then scoring it.

Protocol (paper Table 4): learning rate 1e-2 with 1,000 warm-up steps, 20 epochs, batch size 1 with gradient
accumulation over 16 proteins, no weight decay; the epoch whose model scores best on the validation split is the
one tested. What Table 4 leaves open follows the Hugging Face Trainer defaults that Ankh's published benchmark
scripts ran with: AdamW (betas 0.9/0.999, eps 1e-8), linear decay to zero after the warm-up, gradient norm
clipped at 1.0.

Batch size 1 with accumulation 16 means: each optimiser step averages the per-protein losses of 16 proteins,
each protein's loss being its own mean over its residues (or residue pairs). The trainer computes exactly that
gradient, but runs the 16 proteins of a step laid end to end in one packed row (see ``protlm.evaluate.heads``;
rows of at most ``micro_batch_tokens`` residues) instead of 16 single passes. Attention stays within a protein,
and gaps keep the convolutions apart, so only the speed changes. Contact heads, whose pair scores are per
protein anyway, take one protein per pass.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from protlm.errors import ConfigError
from protlm.evaluate import metrics as M
from protlm.evaluate.heads import ConvBertHead, HeadConfig
from protlm.evaluate.tasks import TaskExample, TaskSpec
from protlm.precision import canonical, choose

PRECISIONS = ("auto", "fp32", "bf16")
# "auto" on a CPU whose bf16 is fast: bf16 autocast from this head width up, fp32 below. One training epoch on one
# thread of an AVX-512 BF16 CPU (SSP-3-like lengths, 320 proteins): width 21 fp32 74k residues/s vs bf16 39k,
# width 128 40k vs 36k, width 256 21k vs 22k; below ~256 the casts cost more than the bf16 products save.
BF16_FROM_WIDTH = 256


def resolve_precision(precision: str, width: int, device: torch.device) -> str:
    """The precision a head of this input width trains in.

    "auto": what :func:`protlm.precision.choose` picks for training on this device (bf16 only where measured
    fast), and on a CPU fp32 for heads narrower than 256 even then.
    """
    chosen = choose(precision, device, "training", option="training.precision", warn=_warn_once).name
    if precision == "auto" and chosen == "bf16" and torch.device(device).type == "cpu" and width < BF16_FROM_WIDTH:
        return "fp32"
    return chosen


def describe_precision(precision: str, device: torch.device | str) -> str:
    """What heads train in under ``training.precision`` on this device, said once before training starts."""
    p = choose(precision, device, "training", option="training.precision", warn=lambda msg: None)
    text = p.describe()
    if precision == "auto" and p.name == "bf16" and torch.device(device).type == "cpu":
        text += f"; heads narrower than {BF16_FROM_WIDTH} inputs train in fp32 (faster there)"
    return text


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    # one head trains per (task, seed, source): say it once per process, not once per head
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(msg, file=sys.stderr)


@dataclass
class HeadTrainConfig:
    """Head training settings; defaults are Ankh3's Table 4 where it gives them."""

    lr: float = 1e-2  # peak learning rate (Table 4)
    warmup_steps: int = 1000  # linear warm-up, in optimiser steps (Table 4)
    epochs: int = 20  # passes over the training split (Table 4)
    batch_size: int = 1  # proteins per forward in the paper's setup (Table 4)
    grad_accum: int = 16  # the paper accumulates 16 batches per optimiser step (Table 4)
    weight_decay: float = 0.0  # (Table 4)
    max_grad_norm: float | None = 1.0  # gradient clipping; HF Trainer default
    adam_betas: tuple[float, float] = (0.9, 0.999)  # HF Trainer default
    adam_eps: float = 1e-8  # HF Trainer default
    # --- speed only; these do not change what is computed, up to float rounding ---
    precision: str = "auto"  # "bf16": autocast matmuls to bfloat16 (weights and optimiser stay fp32); "fp32";
    #                          "auto": bf16 where this device runs it fast, see resolve_precision
    micro_batch_tokens: int = 8192  # residues per packed row when running a step's proteins
    eval_tokens: int = 16384  # residues per packed row when scoring

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        self.precision = canonical(self.precision, "training.precision", PRECISIONS)
        for name in ("epochs", "batch_size", "grad_accum", "micro_batch_tokens", "eval_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("training: lr must be > 0, warmup_steps and weight_decay >= 0")

    @property
    def proteins_per_step(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    valid: dict[str, float]
    seconds: float


@dataclass
class RunResult:
    """One trained head: what it scored and how it got there."""

    valid_best: dict[str, float]  # validation metrics of the selected epoch
    best_epoch: int  # 1-based
    test: dict[str, dict[str, float]]  # test set -> metric -> value
    history: list[EpochLog] = field(default_factory=list)
    steps: int = 0  # optimiser steps taken
    n_train: int = 0
    n_valid: int = 0
    n_test: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # wall-clock
    cpu_seconds: float = 0.0  # CPU time of this process (all threads); unlike wall-clock, not inflated by other jobs
    precision: str = ""  # what the head trained in (training.precision after resolving "auto")
    # test set -> one row per protein (see per_protein_rows): what resampling over proteins needs (bootstrap)
    per_protein: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    target_shift: float = 0.0  # regression: the head predicts (value - shift) / scale
    target_scale: float = 1.0
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the run ended
    head: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # the selected epoch's head
    # fine-tuning: the selected epoch's trained backbone weights (adapters, or the trained blocks), by name
    backbone_state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the head and backbone weights (which go to a head bundle, not to JSON)."""
        skip = ("head", "backbone_state")
        return {k: v for k, v in asdict(replace(self, head=None, backbone_state=None)).items() if k not in skip}


Features = Callable[[TaskExample], np.ndarray]  # (L, D) per-residue embedding of an example
# Fine-tuning passes features with ``trainable = True`` instead (protlm.finetune.backbone.BackboneFeatures): they
# give differentiable (seen, D) tensors for a list of examples (``tensors``), their own optimiser groups
# (``param_groups``), train/eval modes, and a ``state``/``load_state`` pair for keeping the best epoch.


def _is_trainable(features) -> bool:
    return bool(getattr(features, "trainable", False))


def _rows(batch: list[TaskExample], features, precision: str, device: torch.device) -> list:
    """Each example's (seen, D) features: numpy arrays from stored embeddings, or tensors (with gradients while
    training) from a backbone that trains with the head."""
    if _is_trainable(features):
        with _autocast(device, precision):
            return [t.float() for t in features.tensors(batch)]
    out = []
    for e in batch:
        arr = features(e)
        out.append(arr[e.keep] if e.keep is not None else arr)
    return out


def _stack_rows(rows: list, width: int, device: torch.device) -> torch.Tensor:
    """(B, width, D) float32 from per-example (n, D) arrays or tensors, zero-padded (differentiable for tensors)."""
    out = []
    for r in rows:
        t = r if isinstance(r, torch.Tensor) else torch.from_numpy(np.asarray(r, dtype=np.float32))
        t = t.to(device)
        if t.shape[0] < width:
            t = torch.cat([t, t.new_zeros(width - t.shape[0], t.shape[1])], 0)
        out.append(t)
    return torch.stack(out)


def _collate(batch: list[TaskExample], features: Features, kind: str, device: torch.device,
             target_shift: float = 0.0, target_scale: float = 1.0, precision: str = "fp32"):
    L = max(e.seen for e in batch)
    x = _stack_rows(_rows(batch, features, precision, device), L, device)
    mask = torch.zeros(len(batch), L, dtype=torch.bool)
    for i, e in enumerate(batch):
        mask[i, : e.seen] = True
    if kind == "residue_classification":
        y = torch.full((len(batch), L), -1, dtype=torch.long)
        for i, e in enumerate(batch):
            y[i, : e.length] = torch.from_numpy(e.target)
    elif kind == "protein_classification":
        y = torch.tensor([e.target for e in batch], dtype=torch.long)
    elif kind == "protein_regression":
        y = torch.tensor([(e.target - target_shift) / target_scale for e in batch], dtype=torch.float32)
    elif kind == "protein_multilabel":  # (B, C) multi-hot
        y = torch.from_numpy(np.stack([np.asarray(e.target, dtype=np.float32) for e in batch]))
    else:
        y = torch.full((len(batch), L, L), -1, dtype=torch.float32)
        for i, e in enumerate(batch):
            y[i, : e.length, : e.length] = torch.from_numpy(e.target.astype(np.float32))
    return x, mask.to(device), y.to(device)


def _packs(examples: list[TaskExample], token_budget: int, gap: int) -> list[list[TaskExample]]:
    """Consecutive examples grouped so that each group's residues plus the gaps between them fit the budget
    (a protein longer than the budget goes alone)."""
    out: list[list[TaskExample]] = []
    cur: list[TaskExample] = []
    used = 0
    for ex in examples:
        need = ex.seen + (gap if cur else 0)
        if cur and used + need > token_budget:
            out.append(cur)
            cur, used, need = [], 0, ex.seen
        cur.append(ex)
        used += need
    if cur:
        out.append(cur)
    return out


def _collate_packed(batch: list[TaskExample], features: Features, kind: str, device: torch.device, gap: int,
                    target_shift: float = 0.0, target_scale: float = 1.0, precision: str = "fp32"):
    """One packed row (1, N, D) of ``batch`` with ``gap`` masked positions between proteins, its mask, targets
    ((1, N) per residue with -1 at gaps, (S,) per protein) and the proteins' (start, length) segments."""
    segments, pos = [], 0
    for e in batch:
        segments.append((pos, e.seen))
        pos += e.seen + gap
    n = pos - gap
    rows = _rows(batch, features, precision, device)
    mask = torch.zeros(1, n, dtype=torch.bool)
    if isinstance(rows[0], torch.Tensor):  # laid end to end with torch ops, so that gradients flow back
        parts = []
        for i, t in enumerate(rows):
            parts.append(t)
            if i < len(rows) - 1 and gap:
                parts.append(t.new_zeros(gap, t.shape[1]))
        x = torch.cat(parts, 0).unsqueeze(0)
    else:
        x = torch.zeros(1, n, rows[0].shape[-1], dtype=torch.float32)
        for arr, (start, length) in zip(rows, segments):
            x[0, start:start + length] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        x = x.to(device)
    for start, length in segments:
        mask[0, start:start + length] = True
    if kind == "residue_classification":
        y = torch.full((1, n), -1, dtype=torch.long)
        for e, (start, _) in zip(batch, segments):
            y[0, start:start + e.length] = torch.from_numpy(e.target)
    elif kind == "protein_classification":
        y = torch.tensor([e.target for e in batch], dtype=torch.long)
    elif kind == "protein_regression":
        y = torch.tensor([(e.target - target_shift) / target_scale for e in batch], dtype=torch.float32)
    elif kind == "protein_multilabel":  # (B, C) multi-hot
        y = torch.from_numpy(np.stack([np.asarray(e.target, dtype=np.float32) for e in batch]))
    else:
        raise ValueError("contact tasks are not packed")
    return x, mask.to(device), y.to(device), tuple(segments)


def _passes(head: ConvBertHead, examples: list[TaskExample], features: Features, budget: int, device: torch.device,
            shift: float = 0.0, scale: float = 1.0, precision: str = "fp32"):
    """(x, mask, y, segments, batch) for each forward pass over ``examples``: packed rows of at most ``budget``
    residues, or one padded protein per pass for contacts (segments None). ``precision`` is the autocast of a
    trainable backbone's forward (stored features are read as they are)."""
    if head.kind == "contact":
        for e in examples:
            yield (*_collate([e], features, head.kind, device, shift, scale, precision), None, [e])
        return
    gap = head.pack_gap
    for batch in _packs(examples, budget, gap):
        yield (*_collate_packed(batch, features, head.kind, device, gap, shift, scale, precision), batch)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class _Schedule:
    """Linear warm-up to the peak, then linear decay to zero at the last step (HF Trainer's "linear")."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, max(total, 1)

    def __call__(self, step: int) -> float:  # step counts from 0
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


@torch.no_grad()
def head_outputs(head: ConvBertHead, examples: list[TaskExample], features: Features, eval_tokens: int,
                 device: torch.device, precision: str = "fp32") -> Iterator[torch.Tensor]:
    """The head's fp32 logits of each example, in input order: (L, C) per residue, (C,) or () per protein, (L, L)
    for contacts. Scoring and ``protlm predict`` both go through here, so they see the same numbers."""
    head.eval()
    if _is_trainable(features):
        features.train(False)
    for x, mask, _, segments, batch in _passes(head, examples, features, eval_tokens, device, precision=precision):
        logits = head(x, mask, segments).float().cpu()  # fp32 even after bf16 training: coarse scores would tie
        for b, e in enumerate(batch):
            if head.kind == "residue_classification":
                start = segments[b][0]
                yield logits[0, start:start + e.length]
            elif head.kind == "contact":
                yield logits[0, : e.length, : e.length]
            else:
                yield logits[b]


def predict(head: ConvBertHead, examples: list[TaskExample], features: Features, cfg: HeadTrainConfig,
            device: torch.device, target_shift: float = 0.0, target_scale: float = 1.0,
            precision: str = "fp32") -> list[Any]:
    """Per example, in input order: class ids (L,) per residue, a class id, a float, or (L, L) contact scores."""
    out: list[Any] = []
    for logits in head_outputs(head, examples, features, cfg.eval_tokens, device, precision):
        if head.kind == "residue_classification":
            out.append(logits.argmax(-1).numpy())
        elif head.kind == "protein_classification":
            out.append(int(logits.argmax()))
        elif head.kind == "protein_regression":
            out.append(float(logits) * target_scale + target_shift)
        elif head.kind == "protein_multilabel":
            out.append(logits.numpy() > 0)  # (C,) bool: probability above 1/2
        else:
            out.append(torch.sigmoid(logits).numpy())
    return out


def score(task: TaskSpec, examples: list[TaskExample], preds: list[Any]) -> dict[str, float]:
    """The task's metrics for predictions of ``examples``."""
    kind = task.kind
    if kind == "residue_classification":
        targets = [e.target for e in examples]
        return {"accuracy": M.residue_accuracy(preds, [np.maximum(t, 0) for t in targets], [t >= 0 for t in targets])}
    if kind == "protein_classification":
        return {"accuracy": M.accuracy(preds, [e.target for e in examples])}
    if kind == "protein_regression":
        return {"spearman": M.spearman(preds, [e.target for e in examples])}
    if kind == "protein_multilabel":
        return {"f1_micro": M.multilabel_f1(preds, [e.target for e in examples])}
    found = M.contact_metrics(preds, [e.target for e in examples], [e.positions for e in examples],
                              divisors=(1, 2, 5))
    return {m: found[m] for m in task.metrics}


def per_protein_rows(task: TaskSpec, examples: list[TaskExample], preds: list[Any]) -> list[dict[str, Any]]:
    """One row per test protein, holding just enough to recompute the task's metrics over any subset of the
    proteins with :func:`score_rows` (pooled residue accuracy needs counts, Spearman the raw pairs)."""
    rows = []
    for e, p in zip(examples, preds):
        row: dict[str, Any] = {"id": f"{e.dataset}/{e.id}"}
        if task.kind == "residue_classification":
            keep = e.target >= 0
            row["correct"] = int((np.asarray(p)[keep] == e.target[keep]).sum())
            row["scored"] = int(keep.sum())
        elif task.kind == "protein_classification":
            row["correct"] = int(p == e.target)
        elif task.kind == "protein_regression":
            row["pred"], row["target"] = float(p), float(e.target)
        elif task.kind == "protein_multilabel":
            p, t = np.asarray(p, bool), np.asarray(e.target, bool)
            row["tp"], row["fp"], row["fn"] = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        else:
            found = M.contact_metrics([p], [e.target], [e.positions], divisors=(1, 2, 5))
            row.update({m: (None if math.isnan(found[m]) else found[m]) for m in task.metrics})
        rows.append(row)
    return rows


def score_rows(kind: str, metric: str, rows: list[dict[str, Any]]) -> float:
    """A metric from per-protein rows; over all rows it equals :func:`score` (the evaluate tests check this)."""
    if kind == "residue_classification":
        total = sum(r["scored"] for r in rows)
        return sum(r["correct"] for r in rows) / total if total else math.nan
    if kind == "protein_classification":
        return float(np.mean([r["correct"] for r in rows])) if rows else math.nan
    if kind == "protein_regression":
        return M.spearman([r["pred"] for r in rows], [r["target"] for r in rows])
    if kind == "protein_multilabel":
        tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    return float(np.mean(vals)) if vals else math.nan


def bootstrap_interval(kind: str, metric: str, models: list[list[dict[str, Any]]], resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a test metric averaged over ``models`` (e.g. head seeds), each given as
    its per-protein rows of the same test proteins in the same order. Each draw takes the proteins with
    replacement and rescores every model on that draw (:func:`score_rows`). The interval covers the sampling of
    test proteins, not the variation between seeds. (NaN, NaN) when nothing is scorable."""
    n = len(models[0]) if models else 0
    if not n:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        vals = [score_rows(kind, metric, [rows[i] for i in idx]) for rows in models]
        vals = [v for v in vals if not math.isnan(v)]
        draws.append(float(np.mean(vals)) if vals else math.nan)
    arr = np.asarray(draws, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    return float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))


def optimiser_step(head: torch.nn.Module, chunk: list[TaskExample], features: Features, opt, cfg: HeadTrainConfig,
                   device: torch.device, precision: str, backbone_params: list[torch.nn.Parameter] | None = None,
                   class_weights: torch.Tensor | None = None, shift: float = 0.0, scale: float = 1.0) -> float:
    """One optimiser step on the proteins of ``chunk`` (their summed per-protein losses / len(chunk), in packed
    rows of ``cfg.micro_batch_tokens``), clipped and applied; the schedule is the caller's. Returns the loss."""
    total = 0.0
    for x, mask, y, segments, _ in _passes(head, chunk, features, cfg.micro_batch_tokens, device, shift, scale,
                                           precision):
        with _autocast(device, precision):
            logits = head(x, mask, segments)
        loss = head.per_protein_loss(logits, y, segments, class_weights).sum() / len(chunk)
        loss.backward()
        total += float(loss.detach())
    if cfg.max_grad_norm:
        # the head is clipped as in the frozen protocol, the backbone on its own: its gradients never shrink the
        # head's step (and a backbone at learning rate 0 leaves the frozen run unchanged)
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.max_grad_norm)
        if backbone_params:
            torch.nn.utils.clip_grad_norm_(backbone_params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def train_head(
    task: TaskSpec,
    train: list[TaskExample],
    valid: list[TaskExample],
    tests: dict[str, list[TaskExample]],
    features: Features,
    in_dim: int,
    seed: int,
    cfg: HeadTrainConfig,
    head_cfg: HeadConfig,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    *,
    make_head: Callable[[], torch.nn.Module] | None = None,
    class_weights: torch.Tensor | None = None,
    patience: int | None = None,
    resume_file: str | None = None,
    resume_tag: str = "",
) -> RunResult:
    """Train a fresh head on ``train``, pick the epoch that scores best on ``valid`` and score it on ``tests``.

    ``progress(done_steps, total_steps, note)`` is called after each optimiser step and each epoch.
    ``make_head()`` builds the head instead of a ConvBERT head of ``head_cfg`` (``protlm train-head``'s light
    heads); it is called after seeding, so a builder of the same ConvBERT head gives the same run.
    ``class_weights`` go to the loss (see :func:`protlm.evaluate.heads.per_protein_loss`); with ``patience``
    training stops once that many epochs in a row did not beat the best validation score (early stopping; the
    learning-rate schedule stays the one planned for all epochs).

    With ``resume_file`` the run's whole state (head, trained backbone part, optimiser, schedule, best epoch so far,
    RNG streams) is written there after every epoch, and a run that finds the file with the same ``resume_tag``
    goes on after its last epoch instead of starting over: a killed run resumes and ends exactly as an unbroken one
    would. The caller removes the file once the result is safe.
    """
    device = torch.device(device)
    start = time.perf_counter()
    cpu_start = time.process_time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = (make_head() if make_head is not None else ConvBertHead(in_dim, task.kind, task.n_out, head_cfg)).to(device)
    if class_weights is not None:
        class_weights = class_weights.to(device)
    tuned = _is_trainable(features)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters())}]
    if tuned:  # after the head, so that the head's initial weights are the frozen run's
        features.start(seed)
        groups += features.param_groups()
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    backbone_params = [p for g in groups[1:] for p in g["params"]]
    group = cfg.proteins_per_step
    steps_per_epoch = math.ceil(len(train) / group)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Schedule(cfg.warmup_steps, total))
    shift, scale = 0.0, 1.0
    if task.kind == "protein_regression":
        # Standardised targets keep a 1e-2 learning rate sane whatever the label's units; predictions are mapped
        # back, and Spearman does not see the difference anyway.
        values = np.array([e.target for e in train], dtype=np.float64)
        shift, scale = float(values.mean()), float(values.std()) or 1.0
    precision = resolve_precision(cfg.precision, in_dim, device)
    primary = task.metrics[0]
    best: tuple[float, int, dict] | None = None
    history: list[EpochLog] = []
    step, first, spent = 0, 1, 0.0
    saved = _read_epoch_state(resume_file, resume_tag) if resume_file else None
    if saved is not None:
        head.load_state_dict(saved["head"])
        if tuned:
            features.load_state(saved["backbone"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        best, step, spent = saved["best"], saved["step"], saved["seconds"]
        history = [EpochLog(**h) for h in saved["history"]]
        torch.set_rng_state(saved["torch_rng"])
        rng.bit_generator.state = saved["np_rng"]
        first = saved["epoch"] + 1
    for epoch in range(first, cfg.epochs + 1):
        t0 = time.perf_counter()
        head.train()
        if tuned:
            features.train(True)
        order = rng.permutation(len(train))
        losses = []
        for s in range(steps_per_epoch):
            chunk = [train[i] for i in order[s * group:(s + 1) * group]]
            step_loss = optimiser_step(head, chunk, features, opt, cfg, device, precision, backbone_params,
                                       class_weights, shift, scale)
            sched.step()
            step += 1
            losses.append(step_loss)
            if progress is not None:
                progress(step, total, f"epoch {epoch}/{cfg.epochs} loss {np.mean(losses[-50:]):.3f}")
        val = score(task, valid, predict(head, valid, features, cfg, device, shift, scale, precision))
        history.append(EpochLog(epoch, float(np.mean(losses)), val, time.perf_counter() - t0))
        value = val[primary]
        value = -math.inf if math.isnan(value) else value
        if best is None or value > best[0]:
            best = (value, epoch, copy.deepcopy(head.state_dict()), features.state() if tuned else None)
        elif patience is not None and epoch - best[1] >= patience:
            break
        if resume_file and epoch < cfg.epochs:
            _write_epoch_state(resume_file, {
                "tag": resume_tag, "epoch": epoch, "step": step, "head": head.state_dict(),
                "backbone": features.state() if tuned else None, "opt": opt.state_dict(), "sched": sched.state_dict(),
                "best": best, "history": [asdict(h) for h in history], "torch_rng": torch.get_rng_state(),
                "np_rng": rng.bit_generator.state, "seconds": spent + time.perf_counter() - start})
        if progress is not None:
            progress(step, total, f"epoch {epoch}/{cfg.epochs} valid {primary} {val[primary]:.4f}")
    head.load_state_dict(best[2])
    if tuned:
        features.load_state(best[3])
    test_scores, rows = {}, {}
    for name, exs in tests.items():
        preds = predict(head, exs, features, cfg, device, shift, scale, precision)
        test_scores[name] = score(task, exs, preds)
        rows[name] = per_protein_rows(task, exs, preds)
    return RunResult(
        valid_best=history[best[1] - 1].valid, best_epoch=best[1], test=test_scores, history=history, steps=step,
        n_train=len(train), n_valid=len(valid), n_test={k: len(v) for k, v in tests.items()},
        seconds=spent + time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start, per_protein=rows,
        precision=precision, target_shift=shift, target_scale=scale, head=head.cpu().eval(),
        backbone_state=best[3], peak_rss_mb=peak_rss_mb(),
    )


def _write_epoch_state(path: str, state: dict[str, Any]) -> None:
    from protlm.utils import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_epoch_state(path: str, tag: str) -> dict[str, Any] | None:
    """The state a killed run left, or None (no file, another run's file, or a damaged one: start over)."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # written atomically, so a damaged file is foreign: the unit starts over
        return None
    return state if isinstance(state, dict) and state.get("tag") == tag else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024 * 1024 if sys.platform == "darwin" else 1024)
