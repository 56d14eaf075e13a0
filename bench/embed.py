"""End-to-end embedding speed: ``protlm embed`` against transformers recipes on the same weights.

For each model shape and dtype, three runs on the same real proteins, each in a fresh process (so that peak RSS
is per method), timed from reading the FASTA file to a written per-protein HDF5 file (model loading excluded):

- ``protlm``: :func:`protlm.embed.embed_files` with its defaults for the device (length-sorted token-budget
  batches, weights in the compute dtype, inference mode);
- ``prottrans``: the ProtTrans recipe: ``transformers.T5EncoderModel`` with SDPA attention, sequences sorted by
  length, batches of at most 4,000 residues / 100 sequences, sequences over 1,000 residues alone, then
  ``last_hidden_state[i, :L].mean(0)``;
- ``hf-single``: the same model one sequence at a time (no padding), the fastest transformers setting we found on
  this CPU.

Shapes: ``d768x12`` (12 layers, d_model 768, Ankh-base's block) on ``--n`` proteins and ``ankh-base`` (48 layers)
on ``--n-large`` proteins, random weights saved with ``protlm.save_pretrained`` and loaded by both libraries.
The table gives residues/s, ratios, peak RSS, and the share of this machine's measured matmul FLOP/s (useful
FLOPs: projections, feed-forward and attention on real tokens only).

    .venv/bin/python bench/embed.py                           # the full run (hours on 2 CPU cores)
    .venv/bin/python bench/embed.py --n 40 --n-large 8        # a quick look
    .venv/bin/python bench/embed.py --titin                   # also: one 35,000-residue protein, ankh-base, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
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
    ap.add_argument("--shapes", default="d768x12,ankh-base")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-tokens", type=int, default=None, help="protlm's batch budget (default: its CPU default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every run (default: torch's choice); 1 is the fair setting on a loaded machine")
    ap.add_argument("--titin", action="store_true", help="also embed one 35,000-residue protein (ankh-base, bf16)")
    ap.add_argument("--titin-only", action="store_true", help="only the 35,000-residue protein")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    if args.titin_only:
        args.shapes = ""

    import numpy as np
    import torch

    import protlm
    from protlm.data.fasta import read_fasta

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="protlm-bench-embed-")
    records = list(read_fasta(args.data, policy="x"))
    print(f"# data: {args.data} ({len(records)} proteins); work dir {work}")
    print(f"# load at start: {_load()}; torch threads {_threads()}; {os.cpu_count()} CPUs")
    peaks = _matmul_peaks()
    print(f"# measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    results = []
    for shape in filter(None, args.shapes.split(",")):
        n = args.n if shape == "d768x12" else args.n_large
        sample = random.Random(0).sample(records, min(n, len(records)))
        fasta = os.path.join(work, f"{shape}-{n}.fasta")
        with open(fasta, "w") as fh:
            for r in sample:
                fh.write(f">{r.id}\n{r.sequence}\n")
        ckpt = _checkpoint(work, shape)
        cfg = protlm.T5Config.from_json(os.path.join(ckpt, "config.json"))
        lengths = [len(r.sequence) for r in sample]
        flops = sum(_flops(cfg, L + 1) for L in lengths)  # + </s>
        print(f"\n## {shape}: {cfg.num_layers} layers, d_model {cfg.d_model}, {n} proteins, {sum(lengths):,} residues "
              f"(median {int(np.median(lengths))}, max {max(lengths)}), {flops / 1e12:.1f} TFLOP per pass")
        for dtype in args.dtypes.split(","):
            row = {}
            for method in args.methods.split(","):
                job = dict(method=method, ckpt=ckpt, fasta=fasta, dtype=dtype, max_tokens=args.max_tokens,
                           threads=args.threads, out=os.path.join(work, f"{shape}-{dtype}-{method}.h5"))
                before = _load()
                r = _run_worker(job)
                r.update(shape=shape, dtype=dtype, method=method, load_before=before, load_after=_load(),
                         residues=sum(lengths), flops=flops)
                r["res_per_s"] = r["residues"] / r["seconds"]
                r["flop_share"] = flops / r["seconds"] / peaks[dtype]
                row[method] = r
                results.append(r)
                print(f"  {dtype:5s} {method:10s} {r['res_per_s']:8.0f} res/s  {r['seconds']:8.1f} s  peak RSS "
                      f"{r['peak_rss_mib']:6.0f} MiB (embedding phase +{r['phase_rss_mib']:.0f})  "
                      f"{r['flop_share']:.0%} of matmul peak  load {before}->{r['load_after']}", flush=True)
            if "protlm" in row:
                for ref in ("prottrans", "hf-single"):
                    if ref in row:
                        diff = _max_diff(row["protlm"]["out"], row[ref]["out"])
                        print(f"  {dtype:5s} protlm / {ref}: {row['protlm']['res_per_s'] / row[ref]['res_per_s']:.2f}x "
                              f"speed, peak RSS {row['protlm']['peak_rss_mib'] / row[ref]['peak_rss_mib']:.2f}x, "
                              f"max |diff| of per-protein vectors {diff:.1e}", flush=True)
    if args.titin or args.titin_only:
        results.append(_titin(work, records, args.threads))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"\n# load at end: {_load()}")


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
    job = dict(method="protlm", ckpt=_checkpoint(work, "ankh-base"), fasta=fasta, dtype="bf16",
               out=os.path.join(work, "titin.h5"), max_tokens=None, threads=threads)
    before = _load()
    r = _run_worker(job)
    r.update(shape="ankh-base", dtype="bf16", method="protlm-titin", residues=35000, load_before=before, load_after=_load())
    print(f"\n## 35,000-residue protein, ankh-base shape, bf16, window 4000 / overlap 1000: {r['seconds']:.0f} s, "
          f"{35000 / r['seconds']:.0f} res/s, peak RSS {r['peak_rss_mib']:.0f} MiB  load {before}->{r['load_after']}")
    return r


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


def _matmul_peaks() -> dict[str, float]:
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * 2048**3 / (time.perf_counter() - t))
        out[name] = best
    return out


def _max_diff(a: str, b: str) -> float:
    from protlm.embed import EmbeddingStore

    with EmbeddingStore(a) as x, EmbeddingStore(b) as y:
        return max(float(abs(x[i] - y[i]).max()) for i in x.ids())


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_worker(job: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({job['method']} {job['dtype']}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- worker ------------------------------------------------------------------------------------------------------
class _RssSampler:
    """Highest resident set size seen while running (sampled every 5 ms from /proc)."""

    def __init__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(job: dict) -> dict:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    if job["method"] == "protlm":
        import protlm
        from protlm.embed import embed_files

        pre = protlm.load(job["ckpt"], dtype=dtype, encoder_only=True)

        def run():
            opts = {"max_tokens": job["max_tokens"]} if job["max_tokens"] else {}
            embed_files(pre, job["fasta"], per_protein=job["out"], dtype=job["dtype"], progress=False, **opts)
    else:
        from transformers import T5EncoderModel

        model = T5EncoderModel.from_pretrained(job["ckpt"], attn_implementation="sdpa", dtype=dtype).eval()

        def run():
            _transformers_recipe(model, job["ckpt"], job["fasta"], job["out"], single=job["method"] == "hf-single")
    with _RssSampler() as mem:
        t = time.perf_counter()
        run()
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(seconds=seconds, peak_rss_mib=peak / 2**20, phase_rss_mib=(mem.peak - mem.start) / 2**20,
                out=job["out"], threads=torch.get_num_threads())


def _transformers_recipe(model, ckpt: str, fasta: str, out: str, single: bool) -> None:
    """Per-protein vectors the way the ProtTrans examples compute them (own implementation of that recipe).

    Token ids come from protlm's tokenizer (a table lookup, faster than the published SentencePiece tokenizers,
    so the reference is not slowed by it)."""
    import h5py
    import numpy as np
    import torch

    import protlm
    from protlm.data.fasta import read_fasta
    from protlm.embed.store import safe_key
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
