"""Generation speed: protlm's cached decoder against ``transformers`` ``generate`` on the same weights.

Both sides decode greedily from the same prefixes with the same residue-only logits mask, and ``</s>`` is
held back until ``--new-tokens`` (min = max new tokens on both sides), so every row produces exactly that many
tokens and the token counts are equal. Each
configuration is timed ``--repeats`` times, alternating the two implementations, and the best time of each is
kept (the machine is shared; the best run is the least disturbed). The outputs are checked to be identical.

    .venv/bin/python bench/generate.py                       # tiny preset, random weights
    .venv/bin/python bench/generate.py --model ../runs/tiny-cpu/final --batch 1 8
    .venv/bin/python bench/generate.py --model gpt2-medium --batch 1 4 --new-tokens 32   # GPT-2 (ProtGPT2 family)

A GPT-2 model (a causal LM) is timed against ``GPT2LMHeadModel.generate``: both continue ``<|endoftext|>\n`` +
prefix greedily, with the same token mask (residue, line-break and <|endoftext|> tokens) and <|endoftext|> held
back until ``--new-tokens``.

Prints one line per batch size and a JSON summary (with ``uptime`` before and after, since the cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import protlm
from protlm.generation import generate
from protlm.generation.tokens import allowed_mask
from protlm.precision import describe_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FASTA = os.path.join(HERE, "..", "tests", "data", "ecoli_k12_excerpt.fasta")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


def prefixes(path: str, n: int, length: int) -> list[str]:
    from protlm.data.fasta import read_fasta

    seqs = [r.sequence[:length] for r in read_fasta(path) if len(r.sequence) >= length]
    if len(seqs) < n:
        sys.exit(f"{path}: only {len(seqs)} sequences of at least {length} residues; need {n}")
    return seqs[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="checkpoint directory, or a preset (random weights); default tiny")
    ap.add_argument("--fasta", default=DEFAULT_FASTA, help="prefixes are the first --prefix-len residues of these")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to time (default 1 8)")
    ap.add_argument("--prefix-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--natural-end", action="store_true",
                    help="let rows end at </s> (a trained model's real workload) instead of forcing --new-tokens; "
                         "new tokens are then counted as generated (identical on both sides)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    before = uptime()
    pre = protlm.load(args.model) if os.path.isdir(args.model) else protlm.random_init(args.model, seed=0)
    if pre.model.kind == "causal-lm":
        return run_causal(args, pre, before)
    tok = pre.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        protlm.save_pretrained(pre.model, tmp, tok)
        hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp).eval()
    allowed = allowed_mask(tok, pre.config.vocab_size)

    class ResiduesOnly(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    processors = transformers.LogitsProcessorList([ResiduesOnly()])
    min_new = 0 if args.natural_end else args.new_tokens
    results = []
    for batch in args.batch:
        seqs = prefixes(args.fasta, batch, args.prefix_len)
        enc = tok.batch_encode(seqs, prefix="s2s")

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                  num_beams=1, max_new_tokens=args.new_tokens, min_new_tokens=min_new,
                                  logits_processor=processors)
            rows = [row[1:] for row in out.tolist()]
            return [tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row) for row in rows]

        def run_ours():
            out = generate(pre, seqs, strategy="greedy", max_new_tokens=args.new_tokens, min_new_tokens=min_new,
                           batch_size=batch)
            return [c.continuation for c in out]

        times = {"protlm": [], "transformers": []}
        outputs = {}
        run_ours(), run_hf()  # warm-up (allocator, thread pool)
        for _ in range(args.repeats):
            for name, fn in (("protlm", run_ours), ("transformers", run_hf)):
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
        same = outputs["protlm"] == outputs["transformers"]
        # generated residues plus the </s> of each row that ended (the same on both sides when outputs agree)
        n_tokens = sum(min(len(c) + 1, args.new_tokens) for c in outputs["protlm"])
        rate = {k: n_tokens / min(v) for k, v in times.items()}
        row = {"batch": batch, "max_new_tokens": args.new_tokens, "natural_end": args.natural_end,
               "new_tokens": n_tokens, "prefix_len": args.prefix_len,
               "protlm_tok_s": round(rate["protlm"], 1), "transformers_tok_s": round(rate["transformers"], 1),
               "speedup": round(rate["protlm"] / rate["transformers"], 2), "identical_output": same,
               "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()}}
        results.append(row)
        print(f"batch {batch:3d}: protlm {row['protlm_tok_s']:8.1f} new tok/s | transformers "
              f"{row['transformers_tok_s']:8.1f} new tok/s | speedup {row['speedup']:.2f}x | identical output: {same}",
              flush=True)
    summary = {"model": args.model, "params": sum(p.numel() for p in pre.model.parameters()),
               "machine": describe_cpu(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "uptime_before": before, "uptime_after": uptime(),
               "results": results}
    print(json.dumps(summary, indent=1))


def run_causal(args, pre, before: str) -> None:
    """GPT-2: protlm's cached causal decoding against transformers' ``generate`` (greedy, same token mask)."""
    import transformers

    from protlm.generation.causal import allowed_tokens

    tok = pre.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        protlm.save_pretrained(pre.model, tmp, tok)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").eval()
    allowed = allowed_tokens(tok, pre.config.vocab_size, "cpu")

    class Allowed(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    processors = transformers.LogitsProcessorList([Allowed()])
    min_new = 0 if args.natural_end else args.new_tokens
    results = []
    for batch in args.batch:
        seqs = prefixes(args.fasta, batch, args.prefix_len)
        prompts = [tok.encode(s, add_eos=False) for s in seqs]
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as protlm pads prompts
            ids[i, width - len(p):] = torch.as_tensor(p)
            mask[i, width - len(p):] = 1

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=args.new_tokens, min_new_tokens=min_new, logits_processor=processors,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            rows = [row[width:] for row in out.tolist()]
            return [tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row) for row in rows]

        def run_ours():
            out = generate(pre, seqs, strategy="greedy", max_new_tokens=args.new_tokens, min_new_tokens=min_new,
                           batch_size=batch, residues="all")
            return [c.continuation for c in out]

        times = {"protlm": [], "transformers": []}
        outputs = {}
        run_ours(), run_hf()  # warm-up (allocator, thread pool)
        for _ in range(args.repeats):
            for name, fn in (("protlm", run_ours), ("transformers", run_hf)):
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
        same = outputs["protlm"] == outputs["transformers"]
        n_tokens = batch * args.new_tokens if not args.natural_end else None
        if n_tokens is None:  # rows that ended early: count what was generated (tokens, not residues)
            n_tokens = sum(min(len(tok.encode(s + c, add_eos=False)) - len(tok.encode(s, add_eos=False)) + 1,
                               args.new_tokens) for s, c in zip(seqs, outputs["protlm"]))
        rate = {k: n_tokens / min(v) for k, v in times.items()}
        row = {"batch": batch, "max_new_tokens": args.new_tokens, "natural_end": args.natural_end,
               "new_tokens": n_tokens, "prefix_len": args.prefix_len,
               "protlm_tok_s": round(rate["protlm"], 1), "transformers_tok_s": round(rate["transformers"], 1),
               "speedup": round(rate["protlm"] / rate["transformers"], 2), "identical_output": same,
               "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()}}
        results.append(row)
        print(f"batch {batch:3d}: protlm {row['protlm_tok_s']:8.1f} new tok/s | transformers "
              f"{row['transformers_tok_s']:8.1f} new tok/s | speedup {row['speedup']:.2f}x | identical output: {same}",
              flush=True)
    summary = {"model": args.model, "kind": "causal-lm", "params": sum(p.numel() for p in pre.model.parameters()),
               "machine": describe_cpu(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "uptime_before": before, "uptime_after": uptime(),
               "results": results}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
