"""Cost of the full depth analysis (``protlm analyze depth``) on a random-init model (default: 12+12-layer d768).

The figure is the analysis' wall-clock and CPU time over N real proteins, and the same as a multiple of one
plain encoder pass over the same proteins in the same process (the reference run): the analysis needs one
pass with every hidden state kept, one per skipped layer (encoder and decoder), one decoder pass per early-exit
layer, and the probes, so the multiple says how well those passes are shared.

    .venv/bin/python bench/depth.py                          # 200 proteins, 12+12 layers, bf16, all analyses
    .venv/bin/python bench/depth.py --decoder-layers 6 --proteins 50 --dtype fp32
    .venv/bin/python bench/depth.py --model esm2_t12_35M --threads 2     # a masked LM (output: its LM head)
    .venv/bin/python bench/depth.py --skip-proteins all      # skip every layer of every protein (default: 64)
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import protlm
from protlm.analysis import DepthOptions, analyze_depth, write_depth_outputs
from protlm.cli.analyze import count_or_all
from protlm.analysis.depth import embedding_prefix
from protlm.config import EsmConfig, preset
from protlm.data.fasta import read_fasta
from protlm.precision import choose, describe_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def plain_pass(pre, fasta: str, n: int, max_length: int, dtype: torch.dtype) -> tuple[float, float, int]:
    """One encoder forward over the first n proteins (cropped like the analysis), one protein at a time."""
    records = list(read_fasta(fasta, policy="x"))[:n]
    wall, cpu, residues = time.perf_counter(), cpu_seconds(), 0
    with torch.inference_mode():
        for r in records:
            seq = r.sequence[:max_length]
            b = pre.tokenizer.batch_encode([seq], prefix=embedding_prefix(pre.model), unknown="x")
            pre.model.encode(b.input_ids, b.attention_mask)
            residues += len(seq)
    return time.perf_counter() - wall, cpu_seconds() - cpu, residues


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fasta", default=os.path.join(DATA, "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz"))
    ap.add_argument("--probe-data", default=os.path.join(DATA, "ssp_netsurfp"))
    ap.add_argument("--proteins", type=int, default=200)
    ap.add_argument("--model", default="ankh-base",
                    help="preset whose shape is used (default ankh-base: with --layers 12 --decoder-layers 12)")
    ap.add_argument("--layers", type=int, default=None, help="encoder layers (default: 12 for ankh-base, else the "
                    "preset's own)")
    ap.add_argument("--decoder-layers", type=int, default=None, help="decoder layers (T5 presets; default 12 for "
                    "ankh-base)")
    ap.add_argument("--dtype", default="auto", help="auto (default: what protlm would pick on this CPU), fp32 or bf16")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--probe-train", type=int, default=200)
    ap.add_argument("--skip-proteins", default="64", help="proteins the skip analysis runs on, or 'all' (default 64, "
                                                           "as protlm analyze depth)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="also write the analysis outputs here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = choose(args.dtype, "cpu", option="--dtype", allowed=("auto", "fp32", "bf16"))
    dtype = chosen.dtype
    base = preset(args.model)
    if isinstance(base, EsmConfig):
        if args.decoder_layers:
            ap.error(f"{args.model} is a masked LM: it has no decoder")
        cfg = base.replace(num_hidden_layers=args.layers) if args.layers else base
    else:
        default = 12 if args.model == "ankh-base" else None  # the figure's historical 12+12 shape
        layers, dec = args.layers or default, args.decoder_layers or default
        cfg = preset(args.model, **({"num_layers": layers} if layers else {}),
                     **({"num_decoder_layers": dec} if dec else {}))
    pre = protlm.random_init(cfg, seed=0)
    pre.model.to(dtype).eval()
    params = sum(p.numel() for p in pre.model.parameters())
    print(f"# depth-analysis cost: {describe_cpu()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"model: {args.model} shape, {cfg.num_layers}+{cfg.n_decoder_layers} layers, d_model {cfg.d_model}, {params / 1e6:.1f}M "
          f"parameters, random init, {chosen.describe()}; {args.proteins} proteins from {os.path.basename(args.fasta)}")
    print(f"load average at start: {load_average()}", flush=True)

    ref_wall, ref_cpu, residues = plain_pass(pre, args.fasta, args.proteins, args.max_length, dtype)
    print(f"reference: one encoder pass, {residues} residues: {ref_wall:.1f} s wall, {ref_cpu:.1f} s CPU", flush=True)

    options = DepthOptions(max_length=args.max_length, probe_task="ssp3" if args.probe_train else None,
                           probe_data=args.probe_data, probe_train=args.probe_train,
                           probe_test=max(1, args.probe_train // 2),
                           skip_proteins=count_or_all(args.skip_proteins, "--skip-proteins"))
    wall, cpu = time.perf_counter(), cpu_seconds()
    report = analyze_depth(pre, args.fasta, options, max_proteins=args.proteins, progress=True)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    if args.out:
        write_depth_outputs(report, args.out, pre)
    print(f"\nfull depth analysis: {wall:.1f} s wall ({wall / 60:.1f} min), {cpu:.1f} s CPU; "
          f"{wall / ref_wall:.1f}x the reference pass in wall-clock, {cpu / ref_cpu:.1f}x in CPU time")
    print("time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timing.items()))
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
