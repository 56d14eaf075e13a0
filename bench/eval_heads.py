"""Speed of the ConvBERT head's training step (Ankh3 Table 4: batch 1, accumulation 16), against a reference
setup in the same process.

    .venv/bin/python bench/eval_heads.py [--dims 21 128 768] [--proteins 320] [--threads 1]

Reference: one protein per forward pass (the paper's batch 1), fp32, torch's own dropout. Compared:
- padded micro-batches: a step's 16 proteins sorted by length, in padded forwards of <= 2,048 residues (what
  protlm did before packing);
- packed rows (protlm's default): the step's proteins end to end in one row, attention protein by protein;
each with protlm's CPU dropout, in fp32 and bf16 autocast. Every setup trains the same head on the same data for
one pass (one optimiser step per 16 proteins) after a warm-up pass. Lengths are real SSP training chains
(``--data``), or drawn from 60-500 if that file is missing. Reported per CPU-second of this process, so other
jobs on the machine change the absolute numbers but hardly the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from protlm.evaluate import heads as H
from protlm.evaluate.heads import ConvBertHead, HeadConfig
from protlm.evaluate.tasks import TaskExample as Example
from protlm.evaluate.training import _collate, _passes
from protlm.precision import describe_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "ssp_netsurfp", "flip_ss3_sequences.fasta.gz")


def padded_batches(examples: list[Example], token_budget: int) -> list[list[Example]]:
    """Padded micro-batches (what protlm did before packing): consecutive examples, sorted first, grouped so
    that batch size x longest length <= budget."""
    out: list[list[Example]] = []
    cur: list[Example] = []
    longest = 0
    for ex in examples:
        longest_if = max(longest, ex.seen)
        if cur and longest_if * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur, longest_if = [], ex.seen
        cur.append(ex)
        longest = longest_if
    if cur:
        out.append(cur)
    return out


def step_rate(dim: int, exs: list[Example], feats: dict, layout: str, precision: str, torch_dropout: bool) -> float:
    """Residues per CPU-second of one training pass over ``exs``."""
    torch.manual_seed(0)
    head = ConvBertHead(dim, "residue_classification", 3, HeadConfig()).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    features = lambda e: feats[e.id]
    cpu = torch.device("cpu")
    saved = H.dropout
    if torch_dropout:
        H.dropout = lambda x, p, training: torch.nn.functional.dropout(x, p, training)

    def forwards(chunk):
        if layout == "packed":
            for x, mask, y, segments, _ in _passes(head, chunk, features, 8192, cpu):
                yield x, mask, y, segments
        else:
            budget = 1 if layout == "batch-1" else 2048
            for batch in padded_batches(sorted(chunk, key=lambda e: e.length), budget):
                yield (*_collate(batch, features, "residue_classification", cpu), None)

    def one_pass():
        for s in range(0, len(exs), 16):
            chunk = exs[s:s + 16]
            for x, mask, y, segments in forwards(chunk):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = head(x, mask, segments)
                (head.per_protein_loss(logits, y, segments).sum() / len(chunk)).backward()
            opt.step()
            opt.zero_grad()

    try:
        one_pass()  # warm-up
        t0 = time.process_time()
        one_pass()
        return sum(e.length for e in exs) / (time.process_time() - t0)
    finally:
        H.dropout = saved


def lengths(path: str, n: int, rng: np.random.Generator) -> list[int]:
    if os.path.exists(path):
        from protlm.data.fasta import read_fasta

        found = [len(r.sequence) for r in read_fasta(path, policy="x")]
        return [found[i] for i in rng.choice(len(found), n, replace=False)]
    return [int(v) for v in rng.integers(60, 500, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[21, 128, 768], help="head input widths")
    ap.add_argument("--proteins", type=int, default=320)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=DEFAULT_DATA, help="FASTA whose sequence lengths are used")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    lens = lengths(args.data, args.proteins, rng)
    print(f"# {describe_cpu()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    print(f"# {len(lens)} proteins, {sum(lens)} residues (mean {np.mean(lens):.0f}, max {max(lens)}) "
          f"from {args.data if os.path.exists(args.data) else 'random lengths 60-500'}")
    setups = [
        ("padded <= 2048, fp32", "padded", "fp32", False),
        ("padded <= 2048, bf16", "padded", "bf16", False),
        ("packed, fp32", "packed", "fp32", False),
        ("packed, bf16", "packed", "bf16", False),
    ]
    for dim in args.dims:
        exs, feats = [], {}
        for i, L in enumerate(lens):
            exs.append(Example(str(i), "b", L, rng.integers(0, 3, L)))
            feats[str(i)] = rng.standard_normal((L, dim)).astype(np.float32)
        ref = step_rate(dim, exs, feats, "batch-1", "fp32", torch_dropout=True)
        print(f"\nwidth {dim}")
        print(f"{'setup (protlm CPU dropout unless said)':40s} {'res/CPU-s':>10s} {'x ref':>6s}")
        print(f"{'reference: batch 1, fp32, torch dropout':40s} {ref:10.0f} {1.0:6.2f}")
        for name, layout, prec, tdrop in setups:
            r = step_rate(dim, exs, feats, layout, prec, tdrop)
            print(f"{name:40s} {r:10.0f} {r / ref:6.2f}")


if __name__ == "__main__":
    main()
