"""Speed of the ConvBERT head's training step, against a reference setup in the same process.

    .venv/bin/python bench/eval_heads.py [--dim 256] [--proteins 96] [--threads 1]

Reference: one protein per forward pass (the paper's batch 1), fp32, torch's own dropout. Compared: the packed
step protlm uses (a step's proteins in length-sorted padded forwards of <= 4,096 residues), bf16 autocast, and
protlm's CPU dropout. Prints residues/s and the ratio to the reference. Lengths are drawn like SSP chains
(60-500 residues). Numbers depend on what else runs on the machine; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from protlm.evaluate import heads as H
from protlm.evaluate.heads import ConvBertHead, HeadConfig
from protlm.evaluate.tasks import Example
from protlm.evaluate.training import _batches, _collate


def step_rate(dim: int, exs: list[Example], feats: dict, budget: int, precision: str, torch_dropout: bool) -> float:
    torch.manual_seed(0)
    head = ConvBertHead(dim, "residue_classification", 3, HeadConfig()).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    saved = H.dropout
    if torch_dropout:
        H.dropout = lambda x, p, training: torch.nn.functional.dropout(x, p, training)
    try:
        def one_pass():
            for batch in _batches(sorted(exs, key=lambda e: e.length), budget):
                x, mask, y = _collate(batch, lambda e: feats[e.id], "residue_classification", torch.device("cpu"))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = head(x, mask)
                (head.per_protein_loss(logits, y).sum() / len(exs)).backward()
            opt.step()
            opt.zero_grad()

        one_pass()  # warm-up
        t0 = time.perf_counter()
        one_pass()
        return sum(e.length for e in exs) / (time.perf_counter() - t0)
    finally:
        H.dropout = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--proteins", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    exs, feats = [], {}
    for i in range(args.proteins):
        L = int(rng.integers(60, 500))
        exs.append(Example(str(i), "b", L, rng.integers(0, 3, L)))
        feats[str(i)] = rng.standard_normal((L, args.dim)).astype(np.float32)
    ref = step_rate(args.dim, exs, feats, 1, "fp32", torch_dropout=True)
    print(f"width {args.dim}, {args.proteins} proteins, {args.threads} thread(s)")
    print(f"{'setup':52s} {'residues/s':>10s} {'x ref':>6s}")
    print(f"{'reference: batch 1, fp32, torch dropout':52s} {ref:10.0f} {1.0:6.2f}")
    for name, budget, prec, tdrop in [
        ("batch 1, fp32, protlm dropout", 1, "fp32", False),
        ("packed <= 4096 residues, fp32, protlm dropout", 4096, "fp32", False),
        ("packed <= 4096 residues, bf16, torch dropout", 4096, "bf16", True),
        ("packed <= 4096 residues, bf16, protlm dropout (default)", 4096, "bf16", False),
    ]:
        r = step_rate(args.dim, exs, feats, budget, prec, tdrop)
        print(f"{name:52s} {r:10.0f} {r / ref:6.2f}")


if __name__ == "__main__":
    main()
