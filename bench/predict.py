"""``protlm predict`` throughput against ``protlm embed`` alone: what applying the heads adds to embedding.

The same proteins go through the jobs in one process, taking turns for ``--rounds`` rounds (the order rotating),
so that load from other jobs on a shared machine falls on all alike:

- ``embed``: what ``protlm embed MODEL P.fasta --per-protein P.h5`` runs (:func:`protlm.embedding.embed_files`,
  timed from reading the FASTA file to the written HDF5 file);
- ``predict (<head>)``: ``protlm predict MODEL --heads H1 H2 H3 H4 P.fasta -o P.tsv`` (embeds each protein once
  at the heads' layer, applies 4 heads, writes the TSV with per-residue probabilities), timed by the command
  itself from its first part to the written TSV. One job per head type in ``--heads``:
  - ``convbert``: the Table-4 ConvBERT head (one ConvBERT layer of the embedding's width) for every task;
  - ``light``: ProtTrans's predictors, a two-layer CNN per residue and a small MLP on the mean embedding per
    protein (``protlm train-head --head light``).

Model loading is excluded from every job (embed gets the model already loaded; predict times its loop only). The
model is the demo's (``runs/demo``) when it exists, else a checkpoint of the demo's shape with random weights
(speed does not depend on the weights). The heads are the demo's when it has all 4 ConvBERT ones, else heads of
the demo suite's kinds with random weights (SSP-3 and SSP-8 per residue, Localization and Membrane per protein),
saved as bundles for that model.

    .venv/bin/python bench/predict.py                   # 1,000 E. coli proteins, 2 rounds, 1 thread
    .venv/bin/python bench/predict.py --n 200 --rounds 1 --heads light
    .venv/bin/python bench/predict.py --model DIR      # another backbone (random-weight heads of its width)
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")
DEMO = os.path.join(ROOT, "runs", "demo")
HEADS = [("SSP-3", "residue_classification", list("HEC")), ("SSP-8", "residue_classification", list("GHIBESTC")),
         ("Localization", "protein_classification", ["Cell.membrane", "Cytoplasm", "Endoplasmic.reticulum",
                                                     "Extracellular", "Golgi.apparatus", "Lysosome/Vacuole",
                                                     "Mitochondrion", "Nucleus", "Peroxisome", "Plastid"]),
         ("Membrane", "protein_classification", ["M", "S"])]


def demo_shaped_model(directory: str) -> str:
    """A checkpoint of the demo's pretraining shape (the bundled recipe's preset and overrides), random weights."""
    import protlm
    from protlm.demo.bundle import pretrain_config

    section = pretrain_config(directory).model
    config = protlm.preset(section.preset, **section.overrides)
    protlm.save_pretrained(protlm.random_init(config, seed=0, encoder_only=True).model, directory)
    return directory


def random_heads(model: str, directory: str, dtype: str, head_type: str) -> list[str]:
    """4 heads of ``head_type`` (convbert, light) of the demo suite's kinds, with random weights, as bundles for
    ``model``."""
    import protlm
    from protlm.embedding.run import PREFIX_BY_FAMILY
    from protlm.evaluate.bundle import HeadMeta, config_hash, model_name, save_bundle
    from protlm.evaluate.heads import ConvBertHead, HeadConfig, LightHead, LightHeadConfig
    from protlm.convert import read_config

    config = read_config(model)[0]
    paths = []
    for task, kind, classes in HEADS:
        if head_type == "convbert":
            head = ConvBertHead(config.d_model, kind, len(classes), HeadConfig())
        else:
            head = LightHead(config.d_model, kind, len(classes), LightHeadConfig())
        meta = HeadMeta(task=task, kind=kind, classes=classes, in_dim=config.d_model, layer=config.num_layers,
                        prefix=PREFIX_BY_FAMILY.get(config.protlm_family, "none"), head_type=head_type,
                        head_config={}, pooling="mean" if kind.startswith("protein_") else "none",
                        backbone={"model": model_name(model), "config_hash": config_hash(config), "embed_dtype": dtype,
                                  "random_init": False})
        paths.append(save_bundle(os.path.join(directory, head_type, task), head, meta))
    del protlm
    return paths


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_embed(pre, fasta: str, out: str, dtype: str) -> tuple[float, float]:
    """Wall and CPU seconds of one embedding run."""
    from protlm.embedding import embed_files

    t0, c0 = time.perf_counter(), cpu_seconds()
    embed_files(pre, fasta, per_protein=out, progress=False, dtype=dtype)
    return time.perf_counter() - t0, cpu_seconds() - c0


def time_predict(argv: list[str]) -> tuple[float, float]:
    """The command's own wall time, from its last message ("predicted N proteins in S s"), and the CPU seconds of
    the whole call (which also loads the heads and the demo-sized model: well under a second)."""
    import contextlib
    import io

    from protlm.cli.main import main as protlm_main

    err = io.StringIO()
    c0 = cpu_seconds()
    with contextlib.redirect_stderr(err):
        code = protlm_main(argv)
    cpu = cpu_seconds() - c0
    if code != 0:
        sys.exit(f"protlm {' '.join(argv)} failed:\n{err.getvalue()[-3000:]}")
    return float(re.search(r"predicted \d+ proteins in ([\d.]+) s", err.getvalue()).group(1)), cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--model", help="a checkpoint directory to use instead of the demo's model (random heads)")
    ap.add_argument("--n", type=int, default=1000, help="proteins (a seeded sample)")
    ap.add_argument("--max-length", type=int, default=1000, help="leave out longer proteins (default 1000)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", help="embedding dtype for every job (default fp32)")
    ap.add_argument("--heads", nargs="+", default=["convbert", "light"], choices=["convbert", "light"],
                    help="head types, one predict job each (default: both)")
    args = ap.parse_args()

    import torch

    work = tempfile.mkdtemp(prefix="bench-predict-")
    from protlm.data.fasta import read_fasta

    proteins = [(r.id, r.sequence) for r in read_fasta(args.data) if len(r.sequence) <= args.max_length]
    proteins = random.Random(0).sample(proteins, min(args.n, len(proteins)))
    fasta = os.path.join(work, "p.fasta")
    with open(fasta, "w") as fh:
        fh.write("".join(f">{i}\n{s}\n" for i, s in proteins))
    residues = sum(len(s) for _, s in proteins)
    final = args.model or os.path.join(DEMO, "pretrain", "final")
    model = final if os.path.isdir(final) else demo_shaped_model(os.path.join(work, "model"))
    demo_heads = [os.path.join(DEMO, "heads", t) for t, _, _ in HEADS]
    heads: dict[str, tuple[list[str], str]] = {}
    for head_type in args.heads:
        if not args.model and model == final and head_type == "convbert" and all(os.path.isdir(h) for h in demo_heads):
            heads[head_type] = demo_heads, "the demo's 4 trained ConvBERT heads"
        else:
            heads[head_type] = (random_heads(model, os.path.join(work, "heads"), args.dtype, head_type),
                                f"4 random-weight {head_type} heads (SSP-3, SSP-8, Localization, Membrane)")
    what = (f"the model {final}" if args.model else f"the demo model ({final})" if model == final
            else "a random-init checkpoint of the demo shape")
    import protlm

    torch.set_num_threads(args.threads)
    pre = protlm.load(model, encoder_only=True, dtype=args.dtype)
    jobs = {"embed": lambda: time_embed(pre, fasta, os.path.join(work, "p.h5"), args.dtype)}
    for head_type, (paths, _) in heads.items():
        jobs[f"predict ({head_type})"] = (
            lambda paths=paths: time_predict(["predict", model, "--heads", *paths, fasta, "-o",
                                              os.path.join(work, "p.tsv"), "--dtype", args.dtype,
                                              "--threads", str(args.threads)]))
    times: dict[str, list[float]] = {k: [] for k in jobs}
    cpus: dict[str, list[float]] = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for leftover in ("p.h5", "p.tsv"):  # each run does the whole job, not a resume
                path = os.path.join(work, leftover)
                if os.path.exists(path):
                    os.unlink(path)
            wall, cpu = jobs[name]()
            times[name].append(wall)
            cpus[name].append(cpu)
            print(f"round {r + 1} {name:18s} {wall:7.1f} s wall {cpu:7.1f} CPU-s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpus.items()}
    from protlm.precision import describe_cpu

    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"\nmachine: {describe_cpu()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{os.cpu_count()} CPUs, load average {load}; dtype {args.dtype}")
    print(f"{len(proteins)} proteins, {residues:,} residues (E. coli K-12 proteome, seeded sample, "
          f"<= {args.max_length} residues); {what}; heads: " + "; ".join(f"{k}: {w}" for k, (_, w) in heads.items()))
    for k in jobs:
        rounds = ", ".join(f"{t:.1f}" for t in times[k])
        print(f"{k:18s} {best[k]:7.1f} s  {len(proteins) / best[k]:7.1f} proteins/s  "
              f"{residues / best[k]:9,.0f} residues/s  {best_cpu[k]:7.1f} CPU-s  (best of {args.rounds}: {rounds} s)")
    for k in jobs:
        if k != "embed":
            print(f"{k} / embed: wall {best[k] / best['embed']:.3f}, CPU {best_cpu[k] / best_cpu['embed']:.3f} "
                  f"(applying the heads adds {100 * (best[k] / best['embed'] - 1):+.1f}% wall, "
                  f"{100 * (best_cpu[k] / best_cpu['embed'] - 1):+.1f}% CPU)")


if __name__ == "__main__":
    main()
