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
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adafactor":
        cls = ShardedAdafactor if any(isinstance(p, DTensor) for p in params) else torch.optim.Adafactor
        return cls(
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


class ShardedAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` for FSDP2-sharded (DTensor) parameters.

    torch's implementation updates its factored statistics in place, which DTensor refuses when a statistic is
    a reduction across shards (the column means of a row-sharded matrix). This step is the same algorithm,
    operation for operation (torch 2.x ``_single_tensor_adafactor``), written out of place where a reduction
    crosses shards, so DTensor inserts the collectives. The state keeps torch's names and shapes (row_var,
    col_var, variance, step), sharded like the parameter where it can be. Plain tensors go to torch's step.
    """

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                self._update(p, grad, self.state[p], group["lr"], group["beta2_decay"], group["weight_decay"],
                             group["d"], eps1, eps2)
        return loss

    @staticmethod
    def _update(param, grad, state, lr, beta2_decay, weight_decay, d, eps1, eps2) -> None:
        lr = float(lr)
        if eps1 is None:
            eps1 = torch.finfo(param.dtype).eps
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        step = state["step"].item()
        one_minus_beta2 = step ** beta2_decay
        rho = min(lr, 1 / (step ** 0.5))
        alpha = max(eps2, _scalar(param.norm(2)) / (param.numel() ** 0.5)) * rho
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if grad.dim() > 1:
            row_mean = _settle(torch.norm(grad, dim=-1, keepdim=True).square().div(grad.size(-1)))
            col_mean = _settle(torch.norm(grad, dim=-2, keepdim=True).square().div(grad.size(-2)))
            if "row_var" not in state:
                state["row_var"] = torch.zeros_like(row_mean)
                state["col_var"] = torch.zeros_like(col_mean)
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(row_mean, one_minus_beta2)
            col_var.lerp_(col_mean, one_minus_beta2)
            var_estimate = row_var @ col_var
            var_estimate = var_estimate.div(_settle(row_var.mean(dim=-2, keepdim=True)).clamp(min=eps1))
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(grad)
            state["variance"].lerp_(grad * grad, one_minus_beta2)
            var_estimate = state["variance"].clone()
        update = var_estimate.clamp(min=eps1 * eps1).rsqrt().mul(grad)
        denom = max(1.0, _scalar(update.norm(2)) / ((update.numel() ** 0.5) * d))
        param.add_(update, alpha=-alpha / denom)


def _settle(x):
    """A DTensor holding pending partial sums (a reduction across shards) becomes replicated; else as is."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(x, DTensor) and any(pl.is_partial() for pl in x.placements):
        x = x.redistribute(x.device_mesh, [Replicate() if pl.is_partial() else pl for pl in x.placements])
    return x


def _scalar(x) -> float:
    return float(x.full_tensor().item()) if hasattr(x, "full_tensor") else float(x.item())
