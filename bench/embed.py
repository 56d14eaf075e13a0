"""End-to-end embedding speed: ``protlm embed`` against transformers recipes on the same weights.

For each model shape and dtype, three methods embed the same real proteins, each method in its own process
(so peak RSS is per method). The proteins are split into chunks and the methods take turns chunk by chunk
(the order rotating every round), so that the load other jobs put on a shared machine falls on all of them
alike. Each chunk is timed from reading its FASTA file to a written per-protein HDF5 file (model loading
excluded):

- ``protlm``: :func:`protlm.embedding.embed_files` with its defaults for the device (length-sorted token-budget
  batches, weights in the compute dtype, inference mode);
- ``prottrans``: the ProtTrans recipe: ``transformers.T5EncoderModel`` with SDPA attention, sequences sorted by
  length, batches of at most 4,000 residues / 100 sequences, sequences over 1,000 residues alone, then
  ``last_hidden_state[i, :L].mean(0)``;
- ``hf-single``: the same model one sequence at a time (no padding), the fastest transformers setting we found on
  this CPU.

Shapes: ``d768x12`` (12 layers, d_model 768, Ankh-base's block) on ``--n`` proteins and ``ankh-base`` (48 layers)
on ``--n-large`` proteins, random weights saved with ``protlm.save_pretrained`` and loaded by both libraries.
Reported: residues/s, ratios, peak RSS per process, and the share of this machine's matmul FLOP/s (useful FLOPs:
projections, feed-forward and attention on real tokens only; the matmul rate is measured after every turn too).
With ``--rounds R`` the turns are run R times over; each method's best round (least CPU time) is reported, and the
per-round ratios with their median, since a shared machine's timings move by several percent from round to round.

    .venv/bin/python bench/embed.py --threads 1                       # the full run (hours on 2 busy cores)
    .venv/bin/python bench/embed.py --threads 1 --n 40 --n-large 8    # a quick look
    .venv/bin/python bench/embed.py --n 100 --shapes d768x12 --methods protlm,hf-single --rounds 5   # ratio spread
    .venv/bin/python bench/embed.py --threads 1 --titin-only          # one 35,000-residue protein, ankh-base, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "corpus", "UP000000625_83333_ecoli_k12_proteome.fasta.gz")
SHAPES = {
    "d768x12": dict(base="ankh-base", num_layers=12),
    "ankh-base": dict(base="ankh-base"),
}
METHODS = ("protlm", "prottrans", "hf-single")


# --- parent ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="FASTA(.gz) of real proteins (default: E. coli K-12 proteome)")
    ap.add_argument("--n", type=int, default=1000, help="proteins for the 12-layer shape")
    ap.add_argument("--n-large", type=int, default=100, help="proteins for the 48-layer ankh-base shape")
    ap.add_argument("--chunk", type=int, default=50, help="proteins per turn (default 50)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes over all turns; each method's best round counts, and every round's ratio is printed")
    ap.add_argument("--shapes", default="d768x12,ankh-base")
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated: auto (what protlm picks on this CPU, see protlm.precision), fp32, bf16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-tokens", type=int, default=None, help="protlm's batch budget (default: its CPU default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every process (default: torch's choice); 1 is fairer on a busy machine")
    ap.add_argument("--titin", action="store_true", help="also embed one 35,000-residue protein (ankh-base, bf16)")
    ap.add_argument("--titin-only", action="store_true", help="only the 35,000-residue protein")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return

    import numpy as np
    import torch

    import protlm
    from protlm.data.fasta import read_fasta

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="protlm-bench-embed-")
    records = list(read_fasta(args.data, policy="x"))
    print(f"# data: {args.data} ({len(records)} proteins); work dir {work}")
    from protlm.precision import choose, describe_cpu

    print(f"# machine: {describe_cpu()}, {os.cpu_count()} CPUs; torch {torch.__version__}; load at start {_load()}",
          flush=True)
    if "auto" in args.dtypes.split(","):
        chosen = choose("auto", "cpu", "inference")
        print(f"# auto: {chosen.describe()}", flush=True)
        args.dtypes = ",".join(dict.fromkeys(chosen.name if d == "auto" else d for d in args.dtypes.split(",")))
    results = []
    for shape in ([] if args.titin_only else args.shapes.split(",")):
        n = args.n if shape == "d768x12" else args.n_large
        sample = random.Random(0).sample(records, min(n, len(records)))
        chunks = []
        for c in range(0, len(sample), args.chunk):
            path = os.path.join(work, f"{shape}-{c // args.chunk:03d}.fasta")
            with open(path, "w") as fh:
                fh.writelines(f">{r.id}\n{r.sequence}\n" for r in sample[c:c + args.chunk])
            chunks.append(path)
        ckpt = _checkpoint(work, shape)
        cfg = protlm.T5Config.from_json(os.path.join(ckpt, "config.json"))
        lengths = [len(r.sequence) for r in sample]
        flops = sum(_flops(cfg, L + 1) for L in lengths)  # + </s>
        print(f"\n## {shape}: {cfg.num_layers} layers, d_model {cfg.d_model}, {len(sample)} proteins in {len(chunks)} "
              f"turns, {sum(lengths):,} residues (median {int(np.median(lengths))}, max {max(lengths)}), "
              f"{flops / 1e12:.1f} TFLOP per pass", flush=True)
        for dtype in args.dtypes.split(","):
            rows = _compare(args, work, shape, dtype, ckpt, chunks)
            for r in rows.values():
                r.update(shape=shape, dtype=dtype, residues=sum(lengths), flops=flops)
                r["res_per_s"] = r["residues"] / r["seconds"]
                r["res_per_cpu_s"] = r["residues"] / r["cpu_seconds"]
                r["flop_share"] = flops / r["seconds"] / r["matmul"]
                print(f"  {dtype:5s} {r['method']:10s} {r['res_per_s']:8.0f} res/s  {r['seconds']:8.1f} s  "
                      f"{r['res_per_cpu_s']:8.0f} res/cpu-s  "
                      f"peak RSS {r['peak_rss_mib']:6.0f} MiB  {r['flop_share']:.0%} of matmul rate "
                      f"({r['matmul'] / 1e9:.0f} GFLOP/s)", flush=True)
            if "protlm" in rows:
                for ref in ("prottrans", "hf-single"):
                    if ref in rows:
                        pt, other = rows["protlm"], rows[ref]
                        diff = max(_max_diff(a, b) for a, b in zip(pt["outs"], other["outs"]))
                        per_round = [o[1] / p[1] for p, o in zip(pt["rounds"], other["rounds"])]
                        spread = (f"; per round {', '.join(f'{r:.2f}' for r in per_round)}, median "
                                  f"{float(np.median(per_round)):.2f}x" if len(per_round) > 1 else "")
                        print(f"  {dtype:5s} protlm / {ref}: {pt['res_per_s'] / other['res_per_s']:.2f}x speed "
                              f"({pt['res_per_cpu_s'] / other['res_per_cpu_s']:.2f}x per CPU-second{spread}), "
                              f"{pt['peak_rss_mib'] / other['peak_rss_mib']:.2f}x peak RSS, "
                              f"max |diff| of per-protein vectors {diff:.1e}", flush=True)
            results += list(rows.values())
    if args.titin or args.titin_only:
        results.append(_titin(work, records, args.threads))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"\n# load at end: {_load()}")


def _compare(args, work: str, shape: str, dtype: str, ckpt: str, chunks: list[str]) -> dict[str, dict]:
    """Start one process per method, give them the chunks in turn (``--rounds`` times over), return each method's
    best round (with every round's totals)."""
    methods = args.methods.split(",")
    workers = {m: _Worker(dict(method=m, ckpt=ckpt, dtype=dtype, max_tokens=args.max_tokens, threads=args.threads))
               for m in methods}
    for w in workers.values():
        w.wait_ready()
    rounds = []  # per round: {method: (seconds, cpu seconds)}
    outs: dict[str, list[str]] = {m: [] for m in methods}
    rates, loads = [], [_load()]
    for rnd in range(args.rounds):
        seconds = {m: 0.0 for m in methods}
        cpu = {m: 0.0 for m in methods}
        for i, chunk in enumerate(chunks):
            turn = rnd * len(chunks) + i
            order = methods[turn % len(methods):] + methods[:turn % len(methods)]
            for m in order:
                out = os.path.join(work, f"{shape}-{dtype}-{m}-{i:03d}.h5")
                if rnd:
                    os.remove(out)
                took = workers[m].call(dict(cmd="run", fasta=chunk, out=out))
                seconds[m] += took["seconds"]
                cpu[m] += took["cpu"]
                if not rnd:
                    outs[m].append(out)
            rates.append(_matmul_rate(dtype))
            loads.append(_load())
            print(f"    round {rnd + 1}, turn {i + 1}/{len(chunks)}: "
                  + ", ".join(f"{m} {seconds[m]:.0f} s" for m in methods) + f"; load {loads[-1]}", flush=True)
        rounds.append({m: (seconds[m], cpu[m]) for m in methods})
        if args.rounds > 1 and "protlm" in methods:
            print(f"    round {rnd + 1}: " + ", ".join(
                f"protlm / {m} {cpu[m] / cpu['protlm']:.2f}x per CPU-second" for m in methods if m != "protlm"),
                flush=True)
    rows = {}
    for m, w in workers.items():
        end = w.call(dict(cmd="quit"))
        best = min(rounds, key=lambda r: r[m][1])[m]  # the round with the least CPU time
        rows[m] = dict(method=m, seconds=best[0], cpu_seconds=best[1], rounds=[r[m] for r in rounds], outs=outs[m],
                       peak_rss_mib=end["peak_rss_mib"], matmul=sum(rates) / len(rates),
                       load=f"{loads[0]} -> {loads[-1]}")
    return rows


class _Worker:
    """A method in its own process, driven by one JSON line per command."""

    def __init__(self, job: dict):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.job = job

    def wait_ready(self) -> None:
        self._read()

    def call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.job['method']} ({self.job['dtype']}) died; see its stderr above")
        return json.loads(line)


def _titin(work: str, records, threads: int | None) -> dict:
    """One 35,000-residue protein (real E. coli proteins joined; titin's length), ankh-base shape, bf16."""
    seq = ""
    for r in records:
        seq += r.sequence
        if len(seq) >= 35000:
            break
    fasta = os.path.join(work, "titin-sized.fasta")
    with open(fasta, "w") as fh:
        fh.write(f">titin_sized\n{seq[:35000]}\n")
    before = _load()
    w = _Worker(dict(method="protlm", ckpt=_checkpoint(work, "ankh-base"), dtype="bf16", max_tokens=None,
                     threads=threads))
    w.wait_ready()
    seconds = w.call(dict(cmd="run", fasta=fasta, out=os.path.join(work, "titin.h5")))["seconds"]
    peak = w.call(dict(cmd="quit"))["peak_rss_mib"]
    print(f"\n## 35,000-residue protein, ankh-base shape, bf16, window 4000 / overlap 1000: {seconds:.0f} s, "
          f"{35000 / seconds:.0f} res/s, peak RSS {peak:.0f} MiB; load {before} -> {_load()}", flush=True)
    return dict(method="protlm-titin", shape="ankh-base", dtype="bf16", seconds=seconds, peak_rss_mib=peak,
                residues=35000)


def _checkpoint(work: str, shape: str) -> str:
    import protlm

    path = os.path.join(work, f"ckpt-{shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        spec = dict(SHAPES[shape])
        cfg = protlm.preset(spec.pop("base"), **spec)
        pre = protlm.random_init(cfg, seed=0, encoder_only=True)
        protlm.save_pretrained(pre.model, path, pre.tokenizer)
    return path


def _flops(cfg, tokens: int) -> float:
    inner = cfg.num_heads * cfg.d_kv
    proj = 2 * tokens * cfg.d_model * inner * 4
    ffn = 2 * tokens * cfg.d_model * cfg.d_ff * (3 if cfg.is_gated else 2)
    attn = 2 * 2 * tokens * tokens * inner
    return cfg.num_layers * (proj + ffn + attn)


def _matmul_rate(dtype: str, size: int = 1024) -> float:
    """Best FLOP/s of square matmuls (3 tries of 5) with the current thread setting."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - t))
    return best


def _max_diff(a: str, b: str) -> float:
    from protlm.embedding import EmbeddingStore

    with EmbeddingStore(a) as x, EmbeddingStore(b) as y:
        return max(float(abs(x[i] - y[i]).max()) for i in x.ids())


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- worker ------------------------------------------------------------------------------------------------------
def _worker(job: dict) -> None:
    import resource

    # replies go to the real stdout; anything libraries print goes to stderr
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    if job["method"] == "protlm":
        import protlm
        from protlm.embedding import embed_files

        pre = protlm.load(job["ckpt"], dtype=dtype, encoder_only=True)
        opts = {"max_tokens": job["max_tokens"]} if job["max_tokens"] else {}

        def run(fasta, out):
            embed_files(pre, fasta, per_protein=out, dtype=job["dtype"], progress=False, **opts)
    else:
        from transformers import T5EncoderModel

        model = T5EncoderModel.from_pretrained(job["ckpt"], attn_implementation="sdpa", dtype=dtype).eval()

        def run(fasta, out):
            _transformers_recipe(model, job["ckpt"], fasta, out, single=job["method"] == "hf-single")
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            reply.write(json.dumps({"peak_rss_mib": peak / 2**20}) + "\n")
            return
        t, c = time.perf_counter(), time.process_time()
        run(msg["fasta"], msg["out"])
        reply.write(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c}) + "\n")


def _transformers_recipe(model, ckpt: str, fasta: str, out: str, single: bool) -> None:
    """Per-protein vectors the way the ProtTrans examples compute them (own implementation of that recipe).

    Token ids come from protlm's tokenizer (a table lookup, faster than the published SentencePiece tokenizers,
    so the reference is not slowed by it)."""
    import h5py
    import numpy as np
    import torch

    import protlm
    from protlm.data.fasta import read_fasta
    from protlm.embedding.store import safe_key
    from protlm.tokenizer.vocab import load_tokenizer

    cfg = protlm.T5Config.from_json(os.path.join(ckpt, "config.json"))
    tok = load_tokenizer(ckpt, cfg.protlm_family)
    seqs = sorted(((r.id, r.sequence) for r in read_fasta(fasta)), key=lambda x: -len(x[1]))
    batches, cur = [], []
    for rid, s in seqs:
        if single:
            batches.append([(rid, s)])
            continue
        # ProtTrans: at most 4,000 residues and 100 sequences per batch; over 1,000 residues alone
        if cur and (sum(len(x) for _, x in cur) + len(s) > 4000 or len(cur) >= 100 or len(s) > 1000):
            batches.append(cur)
            cur = []
        cur.append((rid, s))
        if len(s) > 1000:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    vectors = {}
    with torch.no_grad():
        for b in batches:
            enc = tok.batch_encode([s for _, s in b])
            h = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
            for i, (rid, s) in enumerate(b):
                vectors[rid] = h[i, :len(s)].float().mean(0).numpy()
    with h5py.File(out, "w") as fh:
        for rid, v in vectors.items():
            fh.create_dataset(safe_key(rid), data=v.astype(np.float32)).attrs["original_id"] = rid


if __name__ == "__main__":
    main()
