"""int8 embedding (``protlm embed --dtype int8``) against protlm's own fp32: speed, and closeness to fp32.

    .venv/bin/python bench/int8.py --threads 1                          # ankh-base-shaped 12-layer encoder
    .venv/bin/python bench/int8.py --threads 1 --model runs/demo/pretrain/final   # a trained model's cosine too

Speed: a 12-layer encoder of Ankh-base's block shape (d_model 768, random weights) embeds the same real proteins
in fp32 and in dynamic int8, in alternating rounds (the best round of each counts, since the machine is shared);
printed as residues/s and the ratio int8 / fp32. ``protlm.embed`` packs a model's int8 weights once and reuses
them while the model lives, so the rounds time steady embedding; the one-off packing is timed on its own and
also printed counted against one round. Closeness: per-residue cosine similarity of int8 to fp32
embeddings, averaged over all residues, for the random-weights encoder and, with ``--model``, for a trained
checkpoint (random weights give no realistic activation outliers, so the trained figure is the one that counts).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import protlm  # noqa: E402
from protlm.config import preset  # noqa: E402
from protlm.data.fasta import read_fasta  # noqa: E402
from protlm.embedding.engine import quantize_int8  # noqa: E402
from protlm.precision import describe_cpu  # noqa: E402

DEFAULT_FASTA = os.path.join(HERE, "..", "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")


def sample(path: str, n: int, max_len: int) -> dict[str, str]:
    records = [r for r in read_fasta(path, policy="x") if len(r.sequence) <= max_len]
    random.Random(0).shuffle(records)
    return {r.id: r.sequence for r in records[:n]}


def embed(pre, seqs: dict[str, str], dtype: str) -> tuple[dict[str, np.ndarray], float]:
    t0 = time.perf_counter()
    out = protlm.embed(pre, seqs, per_residue=True, dtype=dtype)
    return out, time.perf_counter() - t0


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean and minimum per-residue cosine over all residues."""
    x = np.concatenate([a[k] for k in a]).astype(np.float64)
    y = np.concatenate([b[k] for k in a]).astype(np.float64)
    c = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(c.mean()), float(c.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fasta", default=DEFAULT_FASTA, help="real proteins (FASTA, .gz allowed)")
    ap.add_argument("--proteins", type=int, default=40, help="proteins to embed (default 40)")
    ap.add_argument("--max-length", type=int, default=600, help="skip longer proteins (default 600)")
    ap.add_argument("--layers", type=int, default=12, help="encoder blocks of the speed model (default 12)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per dtype (best counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--model", help="also report the cosine for this checkpoint (e.g. the demo's pretrained model)")
    args = ap.parse_args()
    if not os.path.exists(args.fasta):
        sys.exit(f"{args.fasta}: not found; pass --fasta with a protein FASTA file")
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = sample(args.fasta, args.proteins, args.max_length)
    residues = sum(len(s) for s in seqs.values())
    print(f"# int8 embedding benchmark\nmachine: {describe_cpu()}; torch {torch.__version__}; "
          f"quantized engine {torch.backends.quantized.engine}")
    print(f"proteins: {len(seqs)} from {os.path.basename(args.fasta)}, {residues:,} residues")

    cfg = preset("ankh-base", num_layers=args.layers, num_decoder_layers=0)
    pre = protlm.random_init(cfg, seed=0, encoder_only=True)
    print(f"speed model: {cfg.num_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.feed_forward_proj}")
    embed(pre, dict(list(seqs.items())[:2]), "fp32")  # warm-up
    t0 = time.perf_counter()
    quantize_int8(pre.model.encoder)  # the one-off cost of a run; protlm.embed keeps one int8 copy per model
    setup = time.perf_counter() - t0
    embed(pre, dict(list(seqs.items())[:2]), "int8")  # makes the copy the rounds below reuse
    best = {"fp32": float("inf"), "int8": float("inf")}
    outputs = {}
    for rnd in range(args.rounds):
        for dtype in (("fp32", "int8") if rnd % 2 == 0 else ("int8", "fp32")):
            outputs[dtype], seconds = embed(pre, seqs, dtype)
            best[dtype] = min(best[dtype], seconds)
            print(f"  round {rnd + 1} {dtype}: {residues / seconds:8.0f} residues/s ({seconds:.2f} s)", flush=True)
    mean, low = cosine(outputs["int8"], outputs["fp32"])
    print(f"=> int8 {residues / best['int8']:.0f} vs fp32 {residues / best['fp32']:.0f} residues/s: "
          f"{best['fp32'] / best['int8']:.2f}x; per-residue cosine to fp32 (random weights) mean {mean:.4f}, min {low:.4f}")
    print(f"=> quantising the model (once per run and model): {setup:.2f} s; with it counted in one round of "
          f"{residues:,} residues: {best['fp32'] / (best['int8'] + setup):.2f}x")
    if args.model:
        trained = protlm.load(args.model, encoder_only=True)
        a, _ = embed(trained, seqs, "fp32")
        b, _ = embed(trained, seqs, "int8")
        mean, low = cosine(b, a)
        print(f"=> {args.model}: per-residue cosine of int8 to fp32 mean {mean:.4f}, min {low:.4f}")


if __name__ == "__main__":
    main()
