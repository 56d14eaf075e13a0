"""How much faster than transformers' T5 encoder can any implementation get, if it uses torch's CPU kernels?

    .venv/bin/python bench/forward_bound.py                     # 4-layer d768, 16 real proteins, fp32 and bf16
    .venv/bin/python bench/forward_bound.py --layers 12 --proteins 30 --dtypes bf16

Both encoders (protlm and ``transformers`` ``T5EncoderModel`` with sdpa, the same random weights, weights cast to
the dtype) run the same real proteins one at a time, on one thread, under ``torch.profiler``. The script splits
each side's CPU time into the dense matrix products (``aten::mm`` and friends: the q/k/v/o projections and the
FFN), torch's fused CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) and everything else.

An implementation that calls the same matmul and attention kernels cannot be faster than transformers by more
than ``transformers' total / (its matmul + attention time)``: that is the ceiling printed. Going past it takes a
faster kernel than torch ships for this CPU, not a better Python model. Timings are CPU time of this process
(``time.process_time``), so other jobs on a shared machine do not count; the profiler's own overhead is in both
sides alike.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import torch

import protlm
from protlm.config import preset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import DEFAULT_FASTA, load_average, sample_proteins  # noqa: E402

from protlm.precision import choose, describe_cpu  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}


def split_time(run) -> tuple[float, dict[str, float]]:
    """CPU seconds of one call of ``run`` (timed without the profiler) and its shares by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    t = time.process_time()
    run()
    total = time.process_time() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    parts = collections.Counter()
    for e in prof.key_averages():
        kind = "matmul" if e.key in MATMUL else "attention" if e.key in ATTENTION else "other"
        parts[kind] += e.self_cpu_time_total
    whole = sum(parts.values()) or 1.0
    return total, {k: parts[k] / whole for k in ("matmul", "attention", "other")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="encoder layers of the d768 (ankh-base width) model")
    ap.add_argument("--proteins", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1000, help="proteins are cropped to this many residues")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 too where auto picks it (not on CPUs that emulate it)")
    ap.add_argument("--fasta", default=DEFAULT_FASTA)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.dtypes is None:
        args.dtypes = ["fp32"] + (["bf16"] if choose("auto", "cpu").name == "bf16" else [])
    from transformers import T5EncoderModel

    cfg = preset("ankh-base", num_decoder_layers=0, num_layers=args.layers)
    pre = protlm.random_init(cfg, seed=0, encoder_only=True)
    proteins = sample_proteins(args.fasta, args.proteins, args.seed)
    ids = [torch.tensor([pre.tokenizer.encode(seq[: args.max_length], record=pid, unknown="x")])
           for pid, seq in proteins]
    print(f"# attainable speed-up over transformers with torch's kernels: {describe_cpu()}, torch {torch.__version__}, "
          f"1 thread; load average {load_average()}")
    print(f"model: {args.layers} layers, d_model 768, random init; {len(ids)} proteins, "
          f"{sum(x.shape[1] for x in ids)} tokens, one at a time")
    with tempfile.TemporaryDirectory(prefix="protlm-bound-") as tmp:
        protlm.save_pretrained(pre.model, tmp, pre.tokenizer)
        for name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            ours = protlm.load(tmp, dtype=dtype).model.eval()
            theirs = T5EncoderModel.from_pretrained(tmp, attn_implementation="sdpa").to(dtype).eval()
            runs = {"protlm": lambda: [ours.encode(x) for x in ids],
                    "transformers": lambda: [theirs(input_ids=x) for x in ids]}
            with torch.inference_mode():
                for run in runs.values():
                    run()  # warm-up
                measured = {k: split_time(run) for k, run in runs.items()}
            for k, (total, share) in measured.items():
                print(f"  {name} {k:<12} {total:7.2f} CPU-s   matmul {share['matmul']:6.1%}   "
                      f"attention kernel {share['attention']:6.1%}   other {share['other']:6.1%}")
            tf_total, tf_share = measured["transformers"]
            ours_total = measured["protlm"][0]
            ceiling = 1.0 / (tf_share["matmul"] + tf_share["attention"])
            print(f"  => {name}: protlm {tf_total / ours_total:.2f}x transformers; ceiling with the same kernels "
                  f"{ceiling:.2f}x (transformers spends {tf_share['matmul'] + tf_share['attention']:.0%} of its time "
                  "in them)")
            del ours, theirs


if __name__ == "__main__":
    main()
