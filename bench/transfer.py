"""Annotation transfer on DeepLoc: Q10 of 1-nearest-neighbour label transfer (goPredSim / EAT) from the training
split to the test set, with a model's per-protein embeddings and with one-hot composition.

Data (../shared/data/deeploc, see its SOURCES.md): the reference is ``deeploc_our_val_set`` (1,678 proteins, Light
Attention's validation split, a subset of DeepLoc's ~9.5k training split: the full training FASTA is not
available), the queries are ``deeploc_test_set`` (2,768). This is the data ``protlm evaluate``'s Localization
task trains (90%) and validates (10%) its head on, so its Q10 (docs/benchmarks.md) is the trained-head comparison.

Sources:
- the model given by ``--model`` (a checkpoint directory), else a random-init model of ``--preset``
  (default ``tiny-cpu``: the ``tiny`` preset narrowed as in configs/tiny-cpu.yaml, seed 0, the architecture of the
  documented random-init twin column); per-protein = mean over residues of the last layer (``protlm embed``);
- one-hot composition: the mean of protlm evaluate's 21-channel one-hot (amino-acid composition).

Per-protein embeddings are cached under ``--cache`` (``protlm embed`` resumes, so a rerun only searches).

    .venv/bin/python bench/transfer.py [--model DIR | --preset tiny-cpu|tiny] [--references N] [--queries N]
        [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import protlm  # noqa: E402
from protlm.config import preset  # noqa: E402
from protlm.embedding import EmbeddingStore, embed_files  # noqa: E402
from protlm.embedding.transfer import nearest_labels  # noqa: E402
from protlm.evaluate.datasets import read_deeploc_fasta  # noqa: E402
from protlm.evaluate.embeddings import one_hot  # noqa: E402
from protlm.precision import describe_cpu  # noqa: E402

DEEPLOC = os.path.join(HERE, "..", "..", "shared", "data", "deeploc")
TINY_CPU = dict(d_model=128, d_kv=32, num_heads=4, d_ff=320, num_layers=4, num_decoder_layers=2)


def q10_with_interval(correct: np.ndarray, rounds: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy in percent and a percentile bootstrap 95% interval over the queries."""
    rng = np.random.default_rng(seed)
    boot = correct[rng.integers(0, len(correct), size=(rounds, len(correct)))].mean(1)
    return 100 * correct.mean(), 100 * np.quantile(boot, 0.025), 100 * np.quantile(boot, 0.975)


def subsample(records: list, n: int | None, seed: int = 0) -> list:
    """A seeded random subset in file order (the files are sorted by class, so a prefix would be one class)."""
    if n is None or n >= len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


def model_matrices(args, ref, query) -> tuple[str, np.ndarray, np.ndarray, float]:
    name = args.model or f"{args.preset} (random init, seed 0)"
    key = os.path.basename(os.path.normpath(args.model)) if args.model else f"random-{args.preset}"
    path = os.path.join(args.cache, f"deeploc-{key}.per_protein.h5")
    os.makedirs(args.cache, exist_ok=True)
    if args.model:
        model = args.model
    else:
        config = preset("tiny", **(TINY_CPU if args.preset == "tiny-cpu" else {}))
        model = protlm.random_init(config, seed=0, encoder_only=True)
    t0 = time.perf_counter()
    seqs = {r.id: r.sequence for r in ref + query}
    embed_files(model, seqs, per_protein=path, progress=False, dtype="fp32")
    seconds = time.perf_counter() - t0
    with EmbeddingStore(path) as store:
        return (name, np.stack([store[r.id] for r in ref]).astype(np.float32),
                np.stack([store[r.id] for r in query]).astype(np.float32), seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random-init --preset)")
    ap.add_argument("--preset", choices=["tiny-cpu", "tiny"], default="tiny-cpu")
    ap.add_argument("--references", type=int, default=None,
                    help="subsample N reference proteins (seeded; default all 1,678)")
    ap.add_argument("--queries", type=int, default=None, help="subsample N query proteins (seeded; default all 2,768)")
    ap.add_argument("--cache", default="/tmp/protlm-bench-transfer", help="per-protein embeddings cache")
    args = ap.parse_args()

    print(f"machine: {describe_cpu()}; torch cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    ref = subsample(read_deeploc_fasta(os.path.join(DEEPLOC, "deeploc_our_val_set.fasta.gz")), args.references)
    query = subsample(read_deeploc_fasta(os.path.join(DEEPLOC, "deeploc_test_set.fasta.gz")), args.queries)
    ref_ids, q_ids = [r.id for r in ref], [r.id for r in query]
    ref_lab = [r.labels["location"] for r in ref]
    truth = np.array([r.labels["location"] for r in query])
    print(f"reference {len(ref)} proteins (deeploc_our_val_set), queries {len(query)} (deeploc_test_set), "
          f"{sum(len(r.sequence) for r in ref + query):,} residues")

    sources = {"one-hot composition (21)": (np.stack([one_hot(r.sequence).mean(0) for r in ref]),
                                            np.stack([one_hot(r.sequence).mean(0) for r in query]))}
    name, rx, qx, seconds = model_matrices(args, ref, query)
    sources[f"{name} ({rx.shape[1]})"] = (rx, qx)
    print(f"embedding {len(ref) + len(query)} proteins: {seconds:.0f} s (0 when cached)")

    majority = max(set(ref_lab), key=ref_lab.count)
    q, lo, hi = q10_with_interval(truth == majority)
    rows = [("majority class of the reference (" + majority + ")", "-", q, lo, hi, "-", "-")]
    for src, (rx, qx) in sources.items():
        for metric in ("euclidean", "cosine"):
            t0 = time.perf_counter()
            got = nearest_labels(ref_ids, rx, ref_lab, q_ids, qx, k=1, metric=metric)
            search = time.perf_counter() - t0
            pred = np.array([t.label for t in got])
            rel = np.array([t.reliability for t in got])
            correct = pred == truth
            q, lo, hi = q10_with_interval(correct)
            # reliability should rank hits: Q10 of the more reliable half of the queries
            top = rel >= np.median(rel)
            rows.append((src, metric, q, lo, hi, f"{100 * correct[top].mean():.1f}", f"{search:.2f}"))

    print()
    print("| source (width) | metric | Q10 1-NN | 95% CI | Q10, more reliable half | search s |")
    print("|---|---|---|---|---|---|")
    for src, metric, q, lo, hi, top, search in rows:
        print(f"| {src} | {metric} | {q:.2f} | [{lo:.2f}, {hi:.2f}] | {top} | {search} |")


if __name__ == "__main__":
    main()
