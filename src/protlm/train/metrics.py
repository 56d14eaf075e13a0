"""What a training run measures and where it goes: per-task loss and accuracy, throughput, MFU; JSONL and
TensorBoard writers.

Per-task numbers are sums (loss, target tokens, correct tokens) so that micro-batches and processes add up
exactly; they become means only when written.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from protlm.config import T5Config
from protlm.objectives import IGNORE_INDEX, TASKS
from protlm.precision import cpu_isa, cpu_peak_flops

# Sum slots per task: loss over all target tokens, token count, correct tokens; then the same three over the
# residue tokens of the target only (no sentinels, no </s>), which is what the unigram baseline can predict.
SLOTS = ("loss", "tokens", "correct", "res_loss", "res_tokens", "res_correct")


def token_stats(logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor,
                residue_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and per-task sums.

    ``logits`` (B, T, V), ``labels`` (B, T) with -100 on padding, ``task`` (B,) task index. Returns the summed
    loss (a scalar with grad, for backward) and a detached (len(TASKS), len(SLOTS)) float64 table of sums.
    """
    flat = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)  # (B, T), 0 on padding
    valid = labels != IGNORE_INDEX
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels) & valid
        is_res = torch.isin(labels, residue_ids) & valid if residue_ids is not None else torch.zeros_like(valid)
        per_row = torch.stack([
            flat.detach().sum(1), valid.sum(1), correct.sum(1),
            (flat.detach() * is_res).sum(1), is_res.sum(1), (correct & is_res).sum(1),
        ], dim=1).double()  # (B, SLOTS)
        table = torch.zeros(len(TASKS), len(SLOTS), dtype=torch.float64, device=per_row.device)
        table.index_add_(0, task.to(per_row.device), per_row)
    return flat.sum(), table


def summarise(table: torch.Tensor, prefix: str) -> dict[str, float]:
    """Means per task (and overall) from a sums table: ``{prefix}/{task}/loss``, ``.../acc``, ...."""
    t = table.detach().cpu().double().numpy()
    out: dict[str, float] = {}
    rows = [(name, t[i]) for i, name in enumerate(TASKS)] + [("all", t.sum(0))]
    for name, row in rows:
        loss, tokens, correct, res_loss, res_tokens, res_correct = row
        if tokens > 0:
            out[f"{prefix}/{name}/loss"] = loss / tokens
            out[f"{prefix}/{name}/acc"] = correct / tokens
        if res_tokens > 0:
            out[f"{prefix}/{name}/residue_loss"] = res_loss / res_tokens
            out[f"{prefix}/{name}/residue_acc"] = res_correct / res_tokens
    return out


# --- FLOPs and MFU -------------------------------------------------------------------------------------------
def step_flops(cfg: T5Config, enc_lengths: torch.Tensor, dec_lengths: torch.Tensor) -> float:
    """Model FLOPs of one forward+backward over sequences with these lengths (padding excluded).

    Matmuls only: 6 x (weights touched per token) per token, plus attention's QK^T and PV (2 x 2 x Lq x Lk x
    inner per layer, times 3 for backward). Embedding lookups and norms are left out, as is usual for MFU.
    """
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    ffn = (3 if cfg.is_gated else 2) * d * ff
    attn = 4 * d * inner
    enc_w = cfg.num_layers * (attn + ffn)
    dec_w = cfg.n_decoder_layers * (2 * attn + ffn) + d * cfg.vocab_size  # self + cross attention, LM head
    le = enc_lengths.double()
    ld = dec_lengths.double()
    n_enc, n_dec = float(le.sum()), float(ld.sum())
    linear = 6.0 * (enc_w * n_enc + dec_w * n_dec)
    quad = 12.0 * inner * (cfg.num_layers * float((le * le).sum())
                           + cfg.n_decoder_layers * float((ld * ld).sum() + (ld * le).sum()))
    return linear + quad


# Dense bf16 peak per GPU (vendor data sheets, TFLOP/s, without sparsity).
_GPU_PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
                  "A6000": 155.0, "V100": 125.0, "4090": 165.0, "3090": 71.0}


def peak_flops(device: torch.device, precision: str, configured_tflops: float = 0.0) -> tuple[float, str]:
    """Per-device peak FLOP/s of ``precision`` (fp32 or bf16) for MFU, and where the number came from."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "log.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_BF16.items():
            if key in name:
                scale = 1.0 if precision in ("bf16", "fp16") else 0.5  # TF32 tensor cores: half the bf16 rate
                return tflops * 1e12 * scale, f"data sheet ({name})"
        return math.nan, f"unknown GPU {name!r}; set log.peak_tflops"
    # No data sheet fits a shared CPU; the square matmul rate measured here stands in for the peak.
    return cpu_peak_flops(precision), f"measured {precision} matmul on {cpu_isa()}"


def format_flops(flops: float) -> str:
    """A FLOP/s figure with the unit that keeps it readable (a CPU's 1.1 GFLOP/s is not "0.00 TFLOP/s")."""
    if not math.isfinite(flops):
        return "unknown FLOP/s"
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP/s"


# --- writers -------------------------------------------------------------------------------------------------
class MetricsLog:
    """Rank 0's metric sink: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars.

    On resume from step ``s``, records after ``s`` (written by the run that was killed) are dropped first, so
    the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str, tensorboard: bool, resume_step: int | None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate(resume_step)
        self.fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _truncate(self, step: int) -> None:
        from protlm.utils import atomic_write_text

        kept = [rec for rec in read_metrics(self.path) if rec.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        rec = {"step": step, **{k: _finite(v) for k, v in values.items()}}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file in order; none when it does not exist yet. A line that is not JSON
    (blank, or cut short when a run was killed mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _finite(v):
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return None
    return float(v) if isinstance(v, (np.floating, np.integer)) else v


@dataclass
class Throughput:
    """Tokens and FLOPs since the last report."""

    tokens: float = 0.0
    target_tokens: float = 0.0
    flops: float = 0.0
    start: float = 0.0

    def reset(self) -> None:
        self.tokens = self.target_tokens = self.flops = 0.0
        self.start = time.perf_counter()


def residue_baselines(input_ids: np.ndarray, labels: np.ndarray, is_residue: np.ndarray, unigram: np.ndarray,
                      prior: float) -> tuple[float, float, int]:
    """Nats of the residue targets in ``labels`` (B, T) under two order-free models, and their count.

    ``unigram`` (V,) holds residue probabilities (zero elsewhere). The first model is ``unigram`` itself; the
    second is each row's own composition: counts of the residues in that row of ``input_ids`` (B, L), plus
    ``prior`` pseudo-counts spread as ``unigram``. Sentinels, special tokens, padding and ignored labels count
    in neither.
    """
    uni_nats = own_nats = 0.0
    n = 0
    for inputs, row in zip(input_ids, labels):
        targets = row[(row >= 0) & (row < is_residue.size)]
        targets = targets[is_residue[targets]]
        seen = inputs[is_residue[inputs]]
        own = (np.bincount(seen, minlength=unigram.size) + prior * unigram) / (seen.size + prior)
        uni_nats -= float(np.log(unigram[targets]).sum())
        own_nats -= float(np.log(own[targets]).sum())
        n += targets.size
    return uni_nats, own_nats, n

