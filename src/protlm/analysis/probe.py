"""Per-layer linear probes: how much of a residue-level task each layer's representation makes linearly readable.

The probe is a least-squares linear classifier (ridge regression onto one-hot labels, argmax to predict). It
has a closed form, so it is deterministic and needs only the d x d statistics of the training residues, which
are accumulated batch by batch: no layer's features are ever held in memory for the whole set. The ridge
strength is picked per layer from a grid on a held-out fifth of the training proteins (squared error, also
from streamed statistics), then the probe is refit on all training proteins and scored on the test set.

Tasks: ``ssp3``, 3-state secondary structure (H, E, C) on the FLIP "secondary_structure" split of the NetSurfP-2.0
data (train on a sample of the 9,712 training chains, score Q3 on a sample of the 364 NEW364 test chains;
unresolved residues excluded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from protlm.errors import ConfigError, InputError
from protlm.evaluate.datasets import load_flip_ss

PROBE_TASKS = ("ssp3",)
SSP3_CLASSES = "HEC"
SSP3_FILES = ("flip_ss3_sequences.fasta.gz", "flip_ss3_sampled.fasta.gz", "flip_ss3_mask.fasta.gz")
DATA_ENV = "PROTLM_DATA"  # a folder holding the benchmark data folders (e.g. ssp_netsurfp/)
ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strength, relative to the mean eigenvalue of X^T X


# --- data ----------------------------------------------------------------------------------------------------
@dataclass
class ProbeSplit:
    ids: list[str]
    sequences: list[str]
    labels: list[np.ndarray]  # per residue: class index, -1 = excluded (unresolved)


@dataclass
class ProbeTask:
    name: str
    classes: str
    train: ProbeSplit
    test: ProbeSplit
    source: str  # files and split, for the report


def find_task_dir(task: str, data_dir: str | None) -> str:
    """The folder holding a task's files: ``data_dir`` itself, ``data_dir/ssp_netsurfp``, or $PROTLM_DATA/ssp_netsurfp."""
    candidates = []
    if data_dir:
        candidates += [data_dir, os.path.join(data_dir, "ssp_netsurfp")]
    elif os.environ.get(DATA_ENV):
        candidates.append(os.path.join(os.environ[DATA_ENV], "ssp_netsurfp"))
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, f)) for f in SSP3_FILES):
            return folder
    where = data_dir or (f"${DATA_ENV}/ssp_netsurfp" if os.environ.get(DATA_ENV) else None)
    missing = ", ".join(SSP3_FILES)
    if where is None:
        raise ConfigError(f"probe task {task!r} needs its data: pass --probe-data DIR (a folder with {missing}) "
                          f"or set {DATA_ENV}; --task none skips the probes")
    raise ConfigError(f"probe task {task!r}: {where} does not hold {missing}; --task none skips the probes")


def load_probe_task(task: str, data_dir: str | None, n_train: int, n_test: int, seed: int = 0) -> ProbeTask:
    """A seeded sample of ``n_train`` training and ``n_test`` test proteins of a probe task, read with the
    evaluation suite's loader (:func:`protlm.evaluate.datasets.load_flip_ss`)."""
    if task not in PROBE_TASKS:
        raise ConfigError(f"unknown probe task {task!r}; choose one of {', '.join(PROBE_TASKS)} or none")
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"probes need at least 2 training and 1 test protein (got {n_train} and {n_test})")
    folder = find_task_dir(task, data_dir)
    seq_path, lab_path, mask_path = (os.path.join(folder, f) for f in SSP3_FILES)
    splits = load_flip_ss({"sequences": seq_path, "labels": lab_path, "mask": mask_path})
    if not splits["train"] or not splits["test"]:
        raise InputError(f"{lab_path}: no SET=train / SET=test records (is this the FLIP secondary_structure split?)")
    rng = np.random.default_rng(seed)
    lookup = {c: i for i, c in enumerate(SSP3_CLASSES)}

    def sample(records: list, n: int) -> ProbeSplit:
        out = ProbeSplit([], [], [])
        for i in sorted(rng.choice(len(records), size=min(n, len(records)), replace=False)):
            rec = records[i]
            y = np.fromiter((lookup.get(c, -2) for c in rec.labels["ss3"]), dtype=np.int64, count=len(rec.sequence))
            if (y == -2).any():
                pos = int(np.flatnonzero(y == -2)[0])
                raise InputError(f"{rec.where}: label {rec.labels['ss3'][pos]!r} at position {pos + 1} is not one "
                                 f"of {SSP3_CLASSES}")
            if rec.mask is not None:
                y[~rec.mask] = -1  # unresolved residues are neither trained on nor scored
            out.ids.append(rec.id)
            out.sequences.append(rec.sequence)
            out.labels.append(y)
        return out

    train, test = sample(splits["train"], n_train), sample(splits["test"], n_test)
    source = (f"FLIP secondary_structure split in {folder}: {len(train.ids)} of {len(splits['train'])} training "
              f"chains, {len(test.ids)} of {len(splits['test'])} NEW364 test chains (seed {seed})")
    return ProbeTask(task, SSP3_CLASSES, train, test, source)


# --- the streamed ridge probe --------------------------------------------------------------------------------
class _Moments:
    """Sums over residues of x, x x^T, x y^T, y and y.y, in fp64, for features shifted by a fixed vector."""

    def __init__(self, d: int, c: int, device):
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sx, self.sxx = torch.zeros(d, **kw), torch.zeros(d, d, **kw)
        self.sxy, self.sy = torch.zeros(d, c, **kw), torch.zeros(c, **kw)
        self.syy = 0.0

    def add(self, x: Tensor, y: Tensor) -> None:  # x (n, d) fp32 shifted, y (n, c) one-hot fp32
        self.n += x.shape[0]
        self.sx += x.sum(0).double()
        self.sxx += (x.T @ x).double()  # fp32 product per batch, fp64 running sum
        self.sxy += (x.T @ y).double()
        self.sy += y.sum(0).double()
        self.syy += float(y.pow(2).sum())

    def __add__(self, other: "_Moments") -> "_Moments":
        out = _Moments(self.sx.shape[0], self.sy.shape[0], self.sx.device)
        out.n = self.n + other.n
        for name in ("sx", "sxx", "sxy", "sy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.syy = self.syy + other.syy
        return out


def _ridge_solutions(m: _Moments, alphas) -> list[tuple[Tensor, Tensor]]:
    """(W (d, c), b (c,)) of centred ridge regression for each relative strength in ``alphas``."""
    mx, my = m.sx / m.n, m.sy / m.n
    cxx = m.sxx - m.n * torch.outer(mx, mx)
    cxy = m.sxy - m.n * torch.outer(mx, my)
    evals, evecs = torch.linalg.eigh(cxx)
    proj = evecs.T @ cxy
    scale = float(torch.trace(cxx)) / cxx.shape[0]
    out = []
    for a in alphas:
        w = evecs @ (proj / (evals.clamp(min=0) + a * scale + 1e-30)[:, None])
        out.append((w, my - w.T @ mx))
    return out


def _sse(m: _Moments, w: Tensor, b: Tensor) -> float:
    """Sum over the residues of ``m`` of ||W^T x + b - y||^2, from the moments alone."""
    return float(torch.sum(w * (m.sxx @ w)) + 2 * b @ (w.T @ m.sx) + m.n * b @ b
                 - 2 * torch.sum(w * m.sxy) - 2 * b @ m.sy + m.syy)


@dataclass
class ProbeFit:
    alpha: float
    weight: Tensor  # (d, c)
    bias: Tensor  # (c,)


class LayerProbes:
    """One streamed ridge probe per layer. Feed training residues (``add_train``), ``fit``, then ``add_test``."""

    VAL_EVERY = 5  # every fifth training protein is held out to pick the ridge strength

    def __init__(self, layers: list[int], n_classes: int):
        self.layers = list(layers)
        self.c = n_classes
        self.shift: dict[int, Tensor] = {}
        self.moments: dict[tuple[int, int], _Moments] = {}
        self.fits: dict[int, ProbeFit] = {}
        self.correct = {l: 0 for l in self.layers}
        self.total = 0
        self.test_counts = np.zeros(n_classes, dtype=np.int64)
        self.train_counts = np.zeros(n_classes, dtype=np.int64)

    def _prep(self, layer: int, x: Tensor) -> Tensor:
        x = x.float()
        if layer not in self.shift:  # a fixed shift near the mean keeps the fp32 products well conditioned
            self.shift[layer] = x.mean(0)
        return x - self.shift[layer]

    def add_train(self, feats: dict[int, Tensor], y: Tensor, protein: Tensor) -> None:
        """feats: layer -> (n, d) features of n labelled residues; y (n,) classes; protein (n,) protein index."""
        fold = (protein % self.VAL_EVERY == self.VAL_EVERY - 1).long()
        onehot = torch.nn.functional.one_hot(y, self.c).float()
        self.train_counts += np.bincount(y.cpu().numpy(), minlength=self.c)
        for layer in self.layers:
            x = self._prep(layer, feats[layer])
            onehot = onehot.to(x.device)
            for f in (0, 1):
                sel = fold == f
                if sel.any():
                    key = (layer, f)
                    if key not in self.moments:
                        self.moments[key] = _Moments(x.shape[1], self.c, x.device)
                    self.moments[key].add(x[sel.to(x.device)], onehot[sel.to(x.device)])

    def fit(self) -> None:
        for layer in self.layers:
            fit_m, val_m = self.moments.get((layer, 0)), self.moments.get((layer, 1))
            if fit_m is None:
                raise ConfigError("the probe has no training residues (all unresolved or too few proteins)")
            best = 0
            if val_m is not None:
                errors = [_sse(val_m, w, b) for w, b in _ridge_solutions(fit_m, ALPHAS)]
                best = int(np.argmin(errors))
            full = fit_m + val_m if val_m is not None else fit_m
            w, b = _ridge_solutions(full, [ALPHAS[best]])[0]
            self.fits[layer] = ProbeFit(ALPHAS[best], w.float(), b.float())

    def add_test(self, feats: dict[int, Tensor], y: Tensor) -> None:
        self.total += int(y.numel())
        self.test_counts += np.bincount(y.cpu().numpy(), minlength=self.c)
        for layer in self.layers:
            fit = self.fits[layer]
            x = feats[layer].float() - self.shift[layer]
            pred = (x @ fit.weight + fit.bias).argmax(-1)
            self.correct[layer] += int((pred.cpu() == y.cpu()).sum())

    def scores(self) -> list[float]:
        return [self.correct[l] / max(self.total, 1) for l in self.layers]

    def majority_baseline(self) -> float:
        """Test accuracy of always predicting the most frequent training class."""
        return float(self.test_counts[int(np.argmax(self.train_counts))] / max(self.total, 1))
