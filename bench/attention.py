"""protlm's attention (:func:`protlm.model.kernels.attention`) against torch's SDPA on the same tensors, in bf16.

For each head count of the models protlm runs (12: ankh-base, 16: ProtBERT, 20: ESM-2 650M; d_head 64) and each
length, one sequence's self-attention, queries and keys as the families pass them (views of the (L, H, D)
projections). Printed: CPU time per call (best of ``--rounds``) with the written-out path and with SDPA's fused
kernel, the ratio, and each one's largest and mean difference from an fp32 SDPA on the same inputs.

    .venv/bin/python bench/attention.py                    # 2 threads, lengths 64-1022
    .venv/bin/python bench/attention.py --threads 1 --heads 20
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from linear import cpu_time  # bench/linear.py, beside this script

from protlm.model import kernels
from protlm.precision import describe_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 200, 300, 500, 700, 1022])
    ap.add_argument("--heads", type=int, nargs="+", default=[12, 16, 20])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"machine: {describe_cpu()}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}); load average {load}; bf16, d_head 64")
    if not kernels.write_out_pays():
        print("(protlm leaves the written-out path off on this CPU; it is turned on here to measure it)")
    print("| heads | tokens | SDPA ms | protlm ms | ratio | max / mean diff to fp32: SDPA | protlm | path |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    ratios = []
    for heads in args.heads:
        for n in args.lengths:
            x = torch.randn(1, n, 3, heads, 64)
            q, k, v = (x[:, :, i].to(torch.bfloat16).transpose(1, 2) for i in range(3))
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            with torch.inference_mode():
                before = kernels.set_write_out(True)
                try:
                    ours = cpu_time(lambda: kernels.attention(q, k, v), args.calls, args.rounds)
                    out = kernels.attention(q, k, v).float()
                    path = "written out" if kernels._writes_out(q, k, v, None, 0.0, False) else "SDPA"
                finally:
                    kernels.set_write_out(before)
                ref = cpu_time(lambda: F.scaled_dot_product_attention(q, k, v), args.calls, args.rounds)
                fused = F.scaled_dot_product_attention(q, k, v).float()
            if path != "SDPA":
                ratios.append(ref / ours)
            e_ref, e_ours = (fused - exact).abs(), (out - exact).abs()
            print(f"| {heads} | {n} | {1e3 * ref:.2f} | {1e3 * ours:.2f} | {ref / ours:.2f}x | "
                  f"{e_ref.max():.1e} / {e_ref.mean():.1e} | {e_ours.max():.1e} / {e_ours.mean():.1e} | {path} |")
    if ratios:
        r = torch.tensor(ratios)
        print(f"written out: geometric mean {r.log().mean().exp():.2f}x SDPA (min {r.min():.2f}x, max {r.max():.2f}x)")


if __name__ == "__main__":
    main()
