"""Training-step speed: protlm's T5 against ``transformers`` ``T5ForConditionalGeneration``, same run.

Both models get the same config and initial weights (protlm's export, loaded by transformers), the same batch of
Ankh3 denoising examples made by protlm's objectives from real sequences, and the same optimizer
(``torch.optim.Adafactor``, lr 1e-2). A step is forward, loss, backward and optimizer step. Steps alternate
between the two implementations (``--repeats`` rounds of ``--steps`` steps each); each side's median step time
is kept, since the machine is shared. Reported: input tokens/s (non-padding encoder tokens) in fp32 and under
bf16 autocast, and protlm / transformers.

Also reported: the data pipeline's rate (sequences/s for the task mixer plus collation on one core, the work a
trainer does per batch), against the sequences/s that the protlm step consumes.

    .venv/bin/python bench/train_step.py                       # 6+3 layers, d512, 8 x 512 inputs, ~128 targets
    .venv/bin/python bench/train_step.py --layers 2 1 --d-model 256 --batch 4

Prints a table and a JSON summary (with ``uptime`` before and after: the cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from protlm.precision import choose, describe_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")
EXCERPT = os.path.join(HERE, "..", "tests", "data", "ecoli_k12_excerpt.fasta")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


def load_sequences(path: str, min_len: int, n: int | None = None) -> list[np.ndarray]:
    from protlm.data.fasta import read_fasta
    from protlm.tokenizer import protlm_tokenizer

    tok = protlm_tokenizer()
    out = []
    for rec in read_fasta(path, policy="skip"):
        if len(rec.sequence) >= min_len:
            out.append(tok.residue_array(rec.sequence, rec.id, unknown="x"))
            if n is not None and len(out) >= n:
                break
    return out


def make_batch(seqs: list[np.ndarray], batch: int, length: int, targets: int, seed: int = 0) -> dict:
    """``batch`` denoising examples of ``length`` encoder tokens whose targets are about ``targets`` long."""
    from protlm.objectives import ObjectiveConfig, StepParams, TaskMixer, collate
    from protlm.tokenizer import protlm_tokenizer

    tok = protlm_tokenizer()
    residues = length - 2  # [NLU] ... </s>
    # 1-gram masking: target = (sentinel, residue) per masked residue + </s>, so rate = (targets - 1) / 2 / L
    rate = min(0.3, max(0.01, (targets - 1) / 2 / residues))
    mixer = TaskMixer(ObjectiveConfig(task_probs={"denoise": 1.0}, mask_rates=(rate,)), tok, max_length=length)
    rng = np.random.default_rng(seed)
    long_enough = [s for s in seqs if len(s) >= residues]
    if len(long_enough) < batch:
        sys.exit(f"only {len(long_enough)} sequences of at least {residues} residues; need {batch}")
    examples = [mixer(s[:residues], rng, StepParams(rate)) for s in long_enough[:batch]]
    return collate(examples, tok)


def build_models(args):
    import transformers

    import protlm
    from protlm.config import preset

    cfg = preset("small", d_model=args.d_model, num_layers=args.layers[0], num_decoder_layers=args.layers[1],
                 d_ff=args.d_ff, num_heads=args.heads, d_kv=args.d_model // args.heads)
    pre = protlm.random_init(cfg, seed=0)
    tmp = tempfile.mkdtemp(prefix="protlm-bench-")
    protlm.save_pretrained(pre.model, tmp, pre.tokenizer)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp)
    return cfg, pre.model, hf


def timed_steps(model, batch, precision: str, steps: int, hf: bool, opt) -> list[float]:
    times = []
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast:
            if hf:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"], decoder_attention_mask=batch["decoder_attention_mask"]).logits
            else:
                logits = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                               decoder_mask=batch["decoder_attention_mask"]).logits
        # the same loss on both sides: token mean over non-ignored targets, in fp32
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def pipeline_rate(seqs: list[np.ndarray], length: int, seconds: float = 3.0) -> float:
    """Sequences/s through the task mixer (Ankh3 defaults) and collation, in batches of 32, on this core."""
    from protlm.objectives import ObjectiveConfig, TaskMixer, collate, example_generator, step_generator
    from protlm.tokenizer import protlm_tokenizer

    tok = protlm_tokenizer()
    mixer = TaskMixer(ObjectiveConfig(), tok, max_length=length)
    crop = length - 2
    pool = [s[:crop] for s in seqs]
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        params = mixer.step_params(step_generator(0, i))
        examples = [mixer(pool[(i * 32 + j) % len(pool)], example_generator(0, i * 32 + j), params) for j in range(32)]
        collate(examples, tok)
        done += 32
        i += 1
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[6, 3], metavar=("ENC", "DEC"))
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1280)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512, help="encoder tokens per example")
    ap.add_argument("--targets", type=int, default=128, help="approximate decoder target length")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, alternating protlm and transformers")
    ap.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 too where auto picks it for training (not on CPUs that emulate it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fasta", default=None, help=f"sequences (default {CORPUS}, else the test excerpt)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = uptime()
    fasta = args.fasta or (CORPUS if os.path.exists(CORPUS) else EXCERPT)
    seqs = load_sequences(fasta, args.length - 2, n=4 * args.batch)
    batch = make_batch(seqs, args.batch, args.length, args.targets)
    tokens = int(batch["attention_mask"].sum())
    cfg, ours, theirs = build_models(args)
    print(f"model: {args.layers[0]}+{args.layers[1]} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
          f"{cfg.num_heads} heads; batch {tuple(batch['input_ids'].shape)} inputs, "
          f"{tuple(batch['labels'].shape)} targets; torch {torch.__version__}, {torch.get_num_threads()} threads")
    auto = choose('auto', 'cpu', 'training')
    print(f"machine: {describe_cpu()}; auto here: {auto.describe()}")
    if args.precision is None:
        args.precision = ["fp32"] + (["bf16"] if auto.name == "bf16" else [])
    print(f"load before: {before}")
    results = {}
    for precision in args.precision:
        opt_ours = torch.optim.Adafactor(ours.parameters(), lr=1e-2)
        opt_theirs = torch.optim.Adafactor(theirs.parameters(), lr=1e-2)
        # one untimed step each (allocator warm-up, optimizer state)
        timed_steps(ours, batch, precision, 1, False, opt_ours)
        timed_steps(theirs, batch, precision, 1, True, opt_theirs)
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours += timed_steps(ours, batch, precision, args.steps, False, opt_ours)
            t_theirs += timed_steps(theirs, batch, precision, args.steps, True, opt_theirs)
        ours_tps = tokens / statistics.median(t_ours)
        theirs_tps = tokens / statistics.median(t_theirs)
        results[precision] = {"protlm_tokens_per_s": ours_tps, "transformers_tokens_per_s": theirs_tps,
                              "ratio": ours_tps / theirs_tps,
                              "protlm_step_s": sorted(t_ours), "transformers_step_s": sorted(t_theirs)}
        print(f"{precision:5s} protlm {ours_tps:8.0f} tok/s   transformers {theirs_tps:8.0f} tok/s   "
              f"ratio {ours_tps / theirs_tps:.2f}x")
    rate = pipeline_rate(seqs * 8, args.length)
    consumed = max(r["protlm_tokens_per_s"] for r in results.values()) / args.length
    print(f"data pipeline (mixer + collate, 1 core): {rate:.0f} sequences/s; the protlm step consumes "
          f"{consumed:.1f} sequences/s ({rate / consumed:.0f}x headroom)")
    after = uptime()
    print(f"load after: {after}")
    print(json.dumps({"config": vars(args), "input_tokens": tokens, "results": results,
                      "pipeline_sequences_per_s": rate, "consumed_sequences_per_s": consumed,
                      "uptime_before": before, "uptime_after": after}))


if __name__ == "__main__":
    main()
