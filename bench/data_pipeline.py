"""Data-pipeline throughput on one core: sequences/s for Ankh3 masking + collation, and for the whole pipeline.

Stages, each timed in this process on the same real sequences (default: the E. coli K-12 proteome in
../shared/data/corpus, or the vendored excerpt on a fresh clone), pinned to one CPU core with one torch thread:

- ``mix+collate``: TaskMixer (50/50 denoise/complete, per-step rate) + collate on pre-tokenised sequences
  cropped to 510 residues, for 1-gram, merged and span (mean 3) masking. This is the per-batch work of a trainer.
- ``stream``: SequenceStream alone (gzip FASTA parsing, validation, block shuffle, crop).
- ``pipeline``: PretrainBatches (stream + per-sequence seeded generators + mixer + collate), what
  ``protlm pretrain`` runs.

Ratios are printed against ``mix+collate`` (1-gram). The machine's cores are shared; ``uptime`` is printed.

    .venv/bin/python bench/data_pipeline.py [--fasta PATH] [--batch 32] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from protlm.data.stream import SequenceStream  # noqa: E402
from protlm.objectives import ObjectiveConfig, PretrainBatches, TaskMixer, collate, step_generator  # noqa: E402
from protlm.tokenizer import protlm_tokenizer  # noqa: E402
from protlm.precision import describe_cpu  # noqa: E402

CORPUS = os.path.join(HERE, "..", "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")
EXCERPT = os.path.join(HERE, "..", "tests", "data", "ecoli_k12_excerpt.fasta.gz")


def rate(fn, seconds: float) -> float:
    """Calls of ``fn`` (each returns the sequences it handled) per second, best of 3 windows."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            n += fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fasta", default=CORPUS if os.path.exists(CORPUS) else EXCERPT)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per stage")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    print("machine:", describe_cpu())
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    tok = protlm_tokenizer()
    seqs = list(SequenceStream(args.fasta, tok, max_length=args.max_length, epochs=1, seed=0))
    mean_len = float(np.mean([len(s) for s in seqs]))
    print(f"{len(seqs)} sequences from {args.fasta}, mean {mean_len:.0f} residues after cropping to "
          f"{args.max_length - 2}; batch {args.batch}")

    results = {}
    for name, mode in [("1-gram", {}), ("merged", {"merge_adjacent": True}), ("span3", {"mean_span": 3.0})]:
        mixer = TaskMixer(ObjectiveConfig(**mode), tok, max_length=args.max_length)
        rng = np.random.default_rng(0)
        state = {"i": 0, "step": 0}

        def mix_collate():
            i = state["i"]
            batch_seqs = [seqs[(i + k) % len(seqs)] for k in range(args.batch)]
            state["i"], state["step"] = i + args.batch, state["step"] + 1
            params = mixer.step_params(step_generator(0, state["step"]))
            collate([mixer(s, rng, params) for s in batch_seqs], tok)
            return args.batch

        results[f"mix+collate {name}"] = rate(mix_collate, args.seconds)

    stream = SequenceStream(args.fasta, tok, max_length=args.max_length, seed=1)
    items = iter(stream)

    def stream_only():
        for _ in range(args.batch):
            next(items)
        return args.batch

    results["stream"] = rate(stream_only, args.seconds)
    mixer = TaskMixer(ObjectiveConfig(), tok, max_length=args.max_length)
    batches = PretrainBatches(SequenceStream(args.fasta, tok, max_length=args.max_length, seed=2), mixer, args.batch)
    loader = batches.loader()

    def pipeline():
        next(loader)
        return args.batch

    results["pipeline"] = rate(pipeline, args.seconds)

    ref = results["mix+collate 1-gram"]
    print(f"{'stage':<22}{'seq/s':>10}{'tokens/s':>12}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:<22}{r:>10.0f}{r * (mean_len + 2):>12.0f}{r / ref:>8.2f}")
    print("machine:", describe_cpu())
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({"sequences_per_s": {k: round(v) for k, v in results.items()}, "mean_residues": round(mean_len),
                      "batch": args.batch, "fasta": os.path.basename(args.fasta)}))


if __name__ == "__main__":
    main()
