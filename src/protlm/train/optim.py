"""Optimizers and learning-rate schedules.

The Ankh3 recipe (paper Table 3) is Adafactor at lr 1e-2 with T5's ``rsqrt_decay`` and 10k warmup steps:
the rate is held at ``lr`` for ``warmup`` steps and then falls as ``lr * sqrt(warmup / step)``, which for
lr 1e-2 and 10k steps is T5's ``1 / sqrt(max(step, 10k))``.

``torch.optim.Adafactor`` itself already uses ``min(lr, 1 / sqrt(t))`` as its step size and scales each update
by the parameter's RMS (Shazeer & Stern 2018, "relative step size"). With our schedule on top the effective
rate is ``min(schedule(t), 1 / sqrt(t))``, which equals the schedule whenever ``lr * sqrt(warmup) <= 1`` (true
for the Ankh3 values and for the CPU recipes here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from protlm.train.config import OptimSection


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based: the first update is step 1)."""
    step = max(step, 1)
    warm = cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "rsqrt":
        return cfg.lr if step <= warm else cfg.lr * math.sqrt(warm / step)
    # cosine: linear warmup from 0, then half a cosine from lr down to min_lr_ratio * lr at total_steps
    if step <= warm:
        return cfg.lr * step / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimSection, foreach: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters; the lr is set per step by :func:`set_lr`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(
            params, lr=cfg.lr, beta2_decay=cfg.adafactor_beta2_decay, d=cfg.adafactor_clip,
            weight_decay=cfg.weight_decay, foreach=foreach,
        )
    # AdamW: no decay on norms and the position-bias tables (1-D or bucket tables), as is usual for T5/LLMs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "relative_attention_bias" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=foreach)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
