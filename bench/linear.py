"""protlm's inference linear layer (:mod:`protlm.model.kernels`, oneDNN) against ``F.linear`` on the same tensors.

For each weight shape of the models protlm runs, one (tokens, in) @ (in, out) product with bias, alone and with
the activation fused (GELU), in each dtype asked for; CPU time per call (best of ``--rounds``), the ratio, and the
largest difference from ``F.linear``. The shapes are (in, out) of ESM-2 35M (480), ProtBERT / ankh-base (768 and
1024 wide with their FFNs) and T5's gated FFN.

    .venv/bin/python bench/linear.py                        # fp32, 1 thread
    bash bench/avx2.sh .venv/bin/python bench/linear.py     # the same under AVX2 limits
    .venv/bin/python bench/linear.py --dtypes fp32 bf16 --tokens 512
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from protlm.model import kernels
from protlm.precision import describe_cpu

SHAPES = [(480, 480), (480, 1920), (1920, 480), (768, 768), (768, 3072), (3072, 768), (1024, 1024), (1024, 4096),
          (4096, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_time(fn, calls: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512, help="rows of the input (default 512, protlm's CPU batch)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.onednn_available():
        raise SystemExit("this torch has no oneDNN: protlm's linear layers run F.linear, there is nothing to compare")
    if not kernels.onednn_enabled():
        print(f"on this CPU ({torch.backends.cpu.get_cpu_capability()}) protlm's linear layers run F.linear: the oneDNN "
              "path is on only on AVX-512; timed below anyway, to show whether it would pay here")
        kernels.set_onednn(True)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"machine: {describe_cpu()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"load average {load}; {args.tokens} tokens")
    print("| dtype | in x out | F.linear ms | protlm ms | ratio | + GELU: F.linear, F.gelu ms | fused ms | ratio "
          "| max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    torch.manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        for d_in, d_out in SHAPES:
            x = torch.randn(args.tokens, d_in).to(dtype)
            w = (torch.randn(d_out, d_in) / d_in**0.5).to(dtype)
            b = torch.randn(d_out).to(dtype)
            with torch.no_grad():
                ref = cpu_time(lambda: F.linear(x, w, b), args.calls, args.rounds)
                ours = cpu_time(lambda: kernels.linear(x, w, b), args.calls, args.rounds)
                ref_act = cpu_time(lambda: F.gelu(F.linear(x, w, b)), args.calls, args.rounds)
                ours_act = cpu_time(lambda: kernels.linear(x, w, b, "gelu"), args.calls, args.rounds)
                diff = (kernels.linear(x, w, b, "gelu").float() - F.gelu(F.linear(x, w, b)).float()).abs().max()
            ratios.setdefault(name, []).extend([ref / ours, ref_act / ours_act])
            print(f"| {name} | {d_in} x {d_out} | {1e3 * ref:.2f} | {1e3 * ours:.2f} | {ref / ours:.2f}x | "
                  f"{1e3 * ref_act:.2f} | {1e3 * ours_act:.2f} | {ref_act / ours_act:.2f}x | {diff:.1e} |")
    for name, r in ratios.items():
        r = torch.tensor(r)
        print(f"{name}: geometric mean {r.log().mean().exp():.2f}x (min {r.min():.2f}x, max {r.max():.2f}x)")


if __name__ == "__main__":
    main()
