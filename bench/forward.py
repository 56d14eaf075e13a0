"""Encoder throughput of protlm against transformers (T5EncoderModel, EsmModel, BertModel, GPT2Model), same weights,
same proteins, same run.

    .venv/bin/python bench/forward.py            # full: 12-layer d768 (300 proteins) and ankh-base shape (60)
    .venv/bin/python bench/forward.py --quick    # a couple of minutes: 4-layer d768 on 24 proteins
    .venv/bin/python bench/forward.py --dtypes fp32 bf16   # both dtypes instead of the one "auto" picks here
    .venv/bin/python bench/forward.py --shapes esm2_t12_35M esm2_t33_650M   # ESM-2 against transformers' EsmModel
    .venv/bin/python bench/forward.py --shapes prot_bert_l8 gpt2-medium_l8  # BertModel and GPT2Model (8 layers each)

By default both sides run in the dtype that protlm's ``auto`` picks on this CPU (:mod:`protlm.precision`: fp32
where bf16 is emulated, as on AVX2-only CPUs; bf16 where a measured bf16 matmul beats fp32), and transformers
gets its best set-up in that dtype.

For each model shape the script makes random weights, saves them once in the Hugging Face layout and loads
that directory on both sides (``protlm.load`` and ``T5EncoderModel`` / ``EsmModel`` / ``BertModel`` /
``GPT2Model`` ``.from_pretrained(attn_implementation="sdpa")``; ESM shapes are the published ESM-2 presets,
encoder only, no pooler; the BERT and GPT-2 shapes are the ``prot_bert`` and ``gpt2-medium`` presets cut to 8
layers so that they fit a 2-core CPU's time, ``_full`` names the whole depth). Proteins are a seeded sample of a real FASTA file (default: the E. coli
K-12 proteome in ``../shared/data``). Tokens are protlm's, the same ids on both sides: one per residue plus the
family's specials for T5, ESM and BERT; for GPT-2, ProtGPT2's text (``<|endoftext|>``, lines of 60 residues)
through the residue-level BPE a random-init GPT-2 gets, so about one token per residue (ProtGPT2's own vocabulary
would give about a quarter as many tokens; residues/s counts residues either way).

Every measurement runs in a fresh subprocess, so peak memory (the kernel's VmHWM, reset after loading) belongs
to that run alone, and one run's freed memory cannot flatter the next. transformers gets its best set-up: it is
tried one sequence at a time and in length-sorted batches, and for bf16 both with weights cast to bf16 and with
bf16 autocast, on a pilot subset; the fastest goes to the full measurement. protlm runs the way ``protlm embed``
does: weights cast to the compute dtype, length-sorted batches under a token budget, ``torch.inference_mode``.

Printed per shape and dtype: residues/s of each side and their ratio, the share of this machine's matmul FLOP/s
(measured in the same run) that the useful encoder FLOPs reach, and peak memory. The machine is shared: the load
average is printed with the figures, and the two sides are measured in alternating rounds so that a burst of
load hits both. Ratios from one run are what count.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

import torch

import protlm
from protlm.config import BertConfig, EsmConfig, GPT2Config, T5Config, preset
from protlm.precision import choose, describe_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FASTA = os.path.join(HERE, "..", "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")

# name -> (preset, preset overrides, number of proteins)
SHAPES = {
    "d768x12": ("ankh-base", dict(num_layers=12), 300),
    "ankh-base": ("ankh-base", dict(), 60),
    "esm2_t12_35M": ("esm2_t12_35M", dict(), 120),
    "esm2_t33_650M": ("esm2_t33_650M", dict(), 24),
    "prot_bert_l8": ("prot_bert", dict(num_hidden_layers=8), 60),
    "prot_bert_full": ("prot_bert", dict(), 24),
    "gpt2-medium_l8": ("gpt2-medium", dict(n_layer=8), 60),
    "gpt2-medium_full": ("gpt2-medium", dict(), 24),
}
QUICK_SHAPES = {"d768x4": ("ankh-base", dict(num_layers=4), 24)}


# --- machine -------------------------------------------------------------------------------------------------
def load_average() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    """Best FLOP/s of an n x n x n matmul: this machine's practical peak for the dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def family(cfg) -> str:
    return {EsmConfig: "esm", BertConfig: "bert", GPT2Config: "gpt2", T5Config: "t5"}[type(cfg)]


def encoder_flops(cfg, lengths: list[int]) -> float:
    """Useful FLOPs of the encoder on these token counts: the projections, the FFN and the two attention
    matmuls (scores and weighted values, counted in full also for GPT-2's causal attention); padding and
    elementwise work are not counted."""
    if isinstance(cfg, (EsmConfig, BertConfig)):
        d, inner, ff, ff_mats = cfg.hidden_size, cfg.hidden_size, cfg.intermediate_size, 2
    elif isinstance(cfg, GPT2Config):
        d, inner, ff, ff_mats = cfg.n_embd, cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd, 2
    else:
        d, inner, ff, ff_mats = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, 3 if cfg.is_gated else 2
    per_token = 2 * (4 * d * inner + ff_mats * d * ff)
    total = 0.0
    for n in lengths:
        total += cfg.num_layers * (n * per_token + 4 * n * n * inner)
    return total


# --- one measurement (runs in a subprocess) ------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed load-time buffers back so they are not reused for free
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS


def batches_by_budget(rows: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of rows, longest first, packed while rows x longest row stays within max_tokens."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out, cur, width = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * width > max_tokens:
            out.append(cur)
            cur = []
        if not cur:
            width = len(rows[i])
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    with open(spec["rows"]) as fh:
        data = json.load(fh)
    rows: list[list[int]] = data["rows"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    autocast = spec["mode"] == "autocast"
    if spec["impl"] == "protlm":
        if spec.get("sdpa_only"):
            from protlm.model import kernels

            kernels.set_write_out(False)
        model = protlm.load(spec["model_dir"], dtype=dtype).model.encoder
        run = lambda ids, mask: model(ids, mask).last_hidden_state  # noqa: E731
    else:
        from transformers import BertModel, EsmModel, GPT2Model, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if spec["family"] == "esm":
            model = EsmModel.from_pretrained(spec["model_dir"], attn_implementation="sdpa", add_pooling_layer=False)
        elif spec["family"] == "bert":
            model = BertModel.from_pretrained(spec["model_dir"], attn_implementation="sdpa", add_pooling_layer=False)
        elif spec["family"] == "gpt2":
            model = GPT2Model.from_pretrained(spec["model_dir"], attn_implementation="sdpa")
        else:
            model = T5EncoderModel.from_pretrained(spec["model_dir"], attn_implementation="sdpa")
        if not autocast:
            model = model.to(dtype)
        # GPT2Model builds a key/value cache unless told not to; an encoder forward has no use for one
        extra = dict(use_cache=False) if spec["family"] == "gpt2" else {}
        run = lambda ids, mask: model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state  # noqa: E731
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = [[i] for i in range(len(rows))] if spec["max_tokens"] == 0 else batches_by_budget(rows, spec["max_tokens"])
    tensors = [pad([rows[i] for i in b], spec["pad_id"]) for b in plan]

    def forward(ids, mask):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return run(ids, mask)

    _reset_peak()
    rss_before = _rss_kib("VmRSS")
    # warm-up: the shortest and the longest batch (allocator, oneDNN kernels, protlm's fused weights)
    for ids, mask in (tensors[-1], tensors[0]):
        forward(ids, mask)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for ids, mask in tensors:
        forward(ids, mask)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    residues = sum(data["residues"])  # special tokens (</s>, <cls>, line breaks, ...) are not residues
    return dict(
        wall=wall, cpu=cpu, residues=residues, res_per_s=residues / wall, res_per_cpu_s=residues / cpu,
        batches=len(plan),
        peak_mib=_rss_kib("VmHWM") / 1024, before_mib=rss_before / 1024, weight_mib=weight_bytes / 2**20,
        load=load_average(),
    )


def measure(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"worker failed: {spec['impl']} {spec['dtype']} {spec['mode']}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the comparison ------------------------------------------------------------------------------------------
def sample_proteins(path: str, n: int, seed: int) -> list[tuple[str, str]]:
    from protlm.data.fasta import read_fasta

    records = list(read_fasta(path, policy="x"))
    random.Random(seed).shuffle(records)
    return [(r.id, r.sequence) for r in records[:n]]


def label(spec: dict) -> str:
    batching = "1 seq/batch" if spec["max_tokens"] == 0 else f"<= {spec['max_tokens']} tok/batch"
    mode = {"cast": "weights in dtype", "autocast": "bf16 autocast"}[spec["mode"]]
    sdpa = ", SDPA only" if spec.get("sdpa_only") else ""
    return f"{spec['impl']} {spec['dtype']} ({mode}, {batching}{sdpa})"


def hf_candidates(dtype: str, budgets: list[int]) -> list[tuple[str, int]]:
    modes = ["cast"] if dtype == "fp32" else ["cast", "autocast"]
    return [(m, b) for m in modes for b in [0, *budgets]]


def describe_shape(cfg) -> str:
    fam = family(cfg)
    if fam == "t5":
        return (f"{cfg.num_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_heads} heads, "
                f"{cfg.feed_forward_proj}")
    if fam == "gpt2":
        return (f"{cfg.n_layer} layers, d_model {cfg.n_embd}, d_ff {cfg.n_inner or 4 * cfg.n_embd}, "
                f"{cfg.n_head} heads, pre-LN, causal, learned positions, {cfg.activation_function}")
    kind = "rotary, GELU" if fam == "esm" else f"post-LN, learned positions, {cfg.hidden_act}"
    return (f"{cfg.num_layers} layers, d_model {cfg.hidden_size}, d_ff {cfg.intermediate_size}, "
            f"{cfg.num_attention_heads} heads, {kind}")


def run_shape(name, base_preset, overrides, n_proteins, args, peaks, out) -> None:
    cfg = preset(base_preset, **overrides)
    fam = family(cfg)
    if fam == "t5":
        cfg = cfg.replace(num_decoder_layers=0)
    pre = protlm.random_init(cfg, seed=0, encoder_only=True)
    proteins = sample_proteins(args.fasta, n_proteins, args.seed)
    # ESM, BERT and GPT-2 hold max_residues per window; longer proteins are cut to it here (protlm embed would
    # tile them)
    limit = None if fam == "t5" else pre.model.max_residues
    seqs = [(pid, seq[:limit]) for pid, seq in proteins]
    rows = [pre.tokenizer.encode(seq, record=pid, unknown="x") for pid, seq in seqs]
    residues = [len(seq) for _, seq in seqs]
    lengths = [len(r) for r in rows]
    flops = encoder_flops(cfg, lengths)
    pad_id = pre.tokenizer.pad_id
    with tempfile.TemporaryDirectory(prefix="protlm-bench-") as tmp:
        model_dir = os.path.join(tmp, "model")
        protlm.save_pretrained(pre.model, model_dir, pre.tokenizer)
        del pre
        rows_path = os.path.join(tmp, "rows.json")
        with open(rows_path, "w") as fh:
            json.dump(dict(rows=rows, residues=residues), fh)
        n_pilot = max(8, len(rows) // args.pilot_fraction)
        pilot_path = os.path.join(tmp, "pilot.json")
        with open(pilot_path, "w") as fh:
            json.dump(dict(rows=rows[:n_pilot], residues=residues[:n_pilot]), fh)
        print(f"\n## {name}: {describe_shape(cfg)}; {len(rows)} proteins, {sum(residues)} residues in "
              f"{sum(lengths)} tokens (residues min {min(residues)}, median {sorted(residues)[len(residues) // 2]}, "
              f"max {max(residues)})")
        base = dict(model_dir=model_dir, threads=args.threads or torch.get_num_threads(), family=fam, pad_id=pad_id)
        key = "res_per_cpu_s" if args.metric == "cpu" else "res_per_s"
        for dtype in args.dtypes:
            # transformers' best set-up, chosen on a pilot subset
            hf_spec = None
            if len(hf_candidates(dtype, args.hf_budgets)) > 1 and not args.no_pilot:
                trials = []
                for mode, budget in hf_candidates(dtype, args.hf_budgets):
                    spec = dict(base, impl="hf", dtype=dtype, mode=mode, max_tokens=budget, rows=pilot_path)
                    r = measure(spec)
                    trials.append((r[key], spec))
                    print(f"  pilot {label(spec):55s} {r['res_per_s']:8.1f} res/s  {r['res_per_cpu_s']:8.1f} res/cpu-s  "
                          f"(load {r['load']})")
                hf_spec = dict(max(trials, key=lambda t: t[0])[1], rows=rows_path)
            else:
                budget = args.hf_budgets[0] if args.hf_budgets else 0
                hf_spec = dict(base, impl="hf", dtype=dtype, mode="cast", max_tokens=budget, rows=rows_path)
            pt_spec = dict(base, impl="protlm", dtype=dtype, mode="cast", max_tokens=args.max_tokens, rows=rows_path,
                           sdpa_only=args.sdpa_only)
            results = {"protlm": [], "hf": []}
            for rnd in range(args.rounds):
                order = [("protlm", pt_spec), ("hf", hf_spec)] if rnd % 2 == 0 else [("hf", hf_spec), ("protlm", pt_spec)]
                for impl, spec in order:
                    r = measure(spec)
                    results[impl].append(r)
                    print(f"  round {rnd + 1}: {label(spec):55s} {r['res_per_s']:8.1f} res/s  "
                          f"{r['res_per_cpu_s']:8.1f} res/cpu-s  peak {r['peak_mib']:7.0f} MiB  (load {r['load']})")
            best = {k: max(v, key=lambda r: r[key]) for k, v in results.items()}
            peak = peaks[dtype]
            pt, hf = best["protlm"], best["hf"]
            row = dict(shape=name, dtype=dtype, protlm=pt, hf=hf, hf_setup=label(hf_spec), pt_setup=label(pt_spec),
                       ratio=pt["res_per_s"] / hf["res_per_s"], cpu_ratio=pt["res_per_cpu_s"] / hf["res_per_cpu_s"],
                       pt_share=flops / pt["wall"] / peak, hf_share=flops / hf["wall"] / peak)
            out.append(row)
            print(f"  => {dtype}: protlm {pt['res_per_s']:.1f} res/s vs transformers {hf['res_per_s']:.1f} res/s: "
                  f"{row['ratio']:.2f}x (per CPU-second: {pt['res_per_cpu_s']:.1f} vs {hf['res_per_cpu_s']:.1f}, "
                  f"{row['cpu_ratio']:.2f}x); matmul-peak share {row['pt_share']:.0%} vs {row['hf_share']:.0%}; "
                  f"peak RSS {pt['peak_mib']:.0f} vs {hf['peak_mib']:.0f} MiB "
                  f"(above loaded model: {pt['peak_mib'] - pt['before_mib']:.0f} vs {hf['peak_mib'] - hf['before_mib']:.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 4-layer d768 model on 24 proteins, one round")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="model shapes (default: the T5 ones)")
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                    help="compute dtypes to compare in (default: auto, what protlm picks on this CPU)")
    ap.add_argument("--fasta", default=DEFAULT_FASTA, help="proteins to encode (FASTA, .gz allowed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the protein sample")
    ap.add_argument("--proteins", type=int, help="override the number of proteins per shape (300 / 60 / 120 / 24 ...)")
    ap.add_argument("--max-tokens", type=int, default=512,
                    help="protlm's padded-token budget per batch (default: protlm embed's CPU default)")
    ap.add_argument("--hf-budgets", type=int, nargs="*", default=[512, 1536],
                    help="token budgets tried for transformers besides one sequence at a time")
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds per side (best counts)")
    ap.add_argument("--pilot-fraction", type=int, default=6, help="transformers set-ups are tried on 1/N of the proteins")
    ap.add_argument("--no-pilot", action="store_true",
                    help="skip the pilot: transformers gets weights cast and the first --hf-budgets value (0 or none: one "
                         "sequence at a time)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every measurement (default: torch's)")
    ap.add_argument("--metric", choices=["wall", "cpu"], default="wall",
                    help="what picks transformers' set-up and the best round: residues per wall-clock second, or per "
                         "CPU-second of the measuring process (with --threads 1 this leaves out time the process "
                         "waits for other jobs on a shared machine)")
    ap.add_argument("--sdpa-only", action="store_true",
                    help="protlm's attention always on torch's SDPA (kernels.set_write_out(False)): the A/B of its "
                         "written-out bf16 attention")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if not os.path.exists(args.fasta):
        sys.exit(f"{args.fasta}: not found; pass --fasta with a protein FASTA file")
    if args.threads:
        torch.set_num_threads(args.threads)
    default = [k for k, v in SHAPES.items() if v[0] == "ankh-base"]
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in (args.shapes or default)}
    if args.quick:
        args.rounds = 1
    import transformers

    print(f"# protlm forward benchmark\nmachine: {describe_cpu()}, {os.cpu_count()} logical CPUs; torch "
          f"{torch.__version__}; transformers {transformers.__version__}")
    if "auto" in args.dtypes:
        chosen = choose("auto", "cpu", "inference")
        print(f"auto: {chosen.describe()}")
        args.dtypes = list(dict.fromkeys(chosen.name if d == "auto" else d for d in args.dtypes))
    print(f"load average at start: {load_average()}")
    peaks = {}
    for dtype in args.dtypes:
        peaks[dtype] = matmul_flops({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        print(f"matmul peak {dtype}: {peaks[dtype] / 1e9:.0f} GFLOP/s (2048^3, best of 7)")
    out: list[dict] = []
    for name, (base_preset, overrides, n) in shapes.items():
        run_shape(name, base_preset, overrides, args.proteins or n, args, peaks, out)
    print(f"\nload average at end: {load_average()}")
    for dtype in args.dtypes:  # the machine is shared: the practical peak is the best seen at either end
        again = matmul_flops({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        print(f"matmul peak {dtype} at end: {again / 1e9:.0f} GFLOP/s")
        if again > peaks[dtype]:
            for r in out:
                if r["dtype"] == dtype:
                    r["pt_share"] *= peaks[dtype] / again
                    r["hf_share"] *= peaks[dtype] / again
            peaks[dtype] = again
    print("\n| shape | dtype | protlm res/s | transformers res/s (best set-up) | ratio | ratio per CPU-second "
          "| share of matmul peak (protlm / tf) | peak RSS MiB (protlm / tf) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['shape']} | {r['dtype']} | {r['protlm']['res_per_s']:.0f} | {r['hf']['res_per_s']:.0f} "
              f"({r['hf_setup'].split('(', 1)[1].rstrip(')')}) | {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
              f"{r['pt_share']:.0%} / {r['hf_share']:.0%} | {r['protlm']['peak_mib']:.0f} / {r['hf']['peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(peaks=peaks, results=out, machine=describe_cpu()), fh, indent=1)


if __name__ == "__main__":
    main()
