"""Embedding runs: sequences in, per-residue / per-protein arrays out, in memory or in resumable HDF5 files.

- :func:`embed` returns a dict id -> array; :func:`embed_iter` yields :class:`Embedding` records as batches finish;
- :func:`embed_files` is the proteome-scale job behind ``protlm embed``: it skips ids already in the outputs,
  embeds each distinct sequence once, checkpoints to segment files, shards across ``torchrun`` processes and
  merges everything into one file per output (see :mod:`protlm.embedding.store`).

Correctness rules (DESIGN.md): the encoder sees ``[prefix] residues </s>`` (T5) or ``<cls> residues <eos>``
(ESM-2, DPLM); the prefix follows the model family unless given (``[NLU]`` for Ankh3, none for Ankh, ProtT5 and
the ESM families, whose vocabulary has no task tokens); outputs keep exactly the L residue positions; per-protein
is the mean over those positions only. The default window is the model's ``max_residues`` (ESM-2: 1022) or, for
models without a trained limit, 4000 residues.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from protlm.convert import load
from protlm.distributed import all_gather_object, barrier, broadcast_object, init_distributed
from protlm.embedding.engine import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, Embedder, resolve_window
from protlm.embedding.store import EmbeddingWriter, check_output_path, safe_key, sequence_sha1
from protlm.errors import ConfigError, InputError
from protlm.precision import Precision, canonical, choose

KINDS = ("per_residue", "per_protein")
PREFIX_BY_FAMILY = {"ankh3": "nlu", "ankh": "none", "prot-t5": "none", "esm2": "none", "dplm": "none", "custom": "none"}


@dataclass
class EmbedOptions:
    """How to embed; every field has a command-line flag of the same name."""

    layers: object = (-1,)  # encoder layers: 0 = embedding output, l = after block l, last = after the final norm;
    #                          negative counts from the end; "all" for every layer
    prefix: str = "auto"  # auto (by model family) | nlu | s2s | none
    dtype: str = "auto"  # auto (bf16 where this device runs it fast, else fp32; see protlm.precision) | fp32 |
    #                      bf16 | fp16 | int8 (CPU only: dynamic int8 linear layers, approximate)
    device: str | None = None  # None: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu
    max_tokens: int | None = None  # padded tokens per batch; None: 512 on CPU, 16384 on GPU
    max_batch: int | None = None  # rows per batch cap (None: only the token budget limits)
    window: int | None = None  # proteins longer than this many residues go through overlapping windows; None:
    #                            the model's max_residues (ESM-2: 1022), else 4000; never above max_residues
    overlap: int | None = DEFAULT_OVERLAP  # residues shared by neighbouring windows (None: window // 4)
    bad_records: str = "error"  # FASTA records with invalid characters or no sequence: error | skip | x (repair)
    threads: int | None = None  # torch CPU threads (None: torch's default)


@dataclass
class Embedding:
    """The embeddings of one sequence. Arrays are float32; with several layers they gain a leading layer axis."""

    id: str
    sequence: str
    per_residue: np.ndarray | None  # (L, D) or (n_layers, L, D)
    per_protein: np.ndarray | None  # (D,) or (n_layers, D)


@dataclass
class EmbedSummary:
    """What a run did; counts cover all processes under torchrun."""

    outputs: dict[str, str]  # kind -> path
    records: int = 0  # sequences accepted from the input
    already_done: int = 0  # ids found in the outputs and skipped
    embedded: int = 0  # ids written by this run
    unique: int = 0  # distinct sequences computed
    residues: int = 0  # residues computed (window overlaps counted twice)
    windowed: int = 0  # proteins longer than the window
    seconds: float = 0.0
    skipped_records: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    repaired_records: int = 0
    fp16_fallbacks: int = 0
    oom_splits: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    dtype: str = ""
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        rate = self.residues / self.seconds if self.seconds > 0 else 0.0
        lines = [f"embedded {self.embedded} of {self.records} proteins ({self.unique} distinct sequences, "
                 f"{self.residues:,} residues) in {self.seconds:.1f} s, {rate:,.0f} residues/s, {self.dtype}"]
        if self.already_done:
            lines.append(f"skipped {self.already_done} proteins already in the output")
        if self.skipped_records:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skip_reasons.items()))
            lines.append(f"skipped {self.skipped_records} bad input records ({why})")
        if self.repaired_records:
            lines.append(f"repaired {self.repaired_records} input records (gaps dropped, other characters -> X)")
        if self.windowed:
            lines.append(f"{self.windowed} proteins longer than the window were embedded in overlapping windows")
        if self.fp16_fallbacks:
            lines.append(f"{self.fp16_fallbacks} batches overflowed fp16 and were recomputed in fp32 "
                         "(use --dtype bf16 to avoid this)")
        if self.oom_splits:
            lines.append(f"{self.oom_splits} batches were split after running out of memory (lower --max-tokens)")
        if self.padded_tokens:
            lines.append(f"padding: {1 - self.real_tokens / self.padded_tokens:.1%} of computed tokens")
        lines += self.notes
        lines += [f"wrote {path} ({kind.replace('_', '-')})" for kind, path in self.outputs.items()]
        return "\n".join(lines)


# --- public API ------------------------------------------------------------------------------------------------
def embed(model, sequences, per_residue: bool = False, *, random_init: bool = False, seed: int = 0,
          **options) -> dict[str, np.ndarray]:
    """Embed ``sequences`` and return ``{id: array}``: per-protein (D,) arrays, or (L, D) with ``per_residue``.

    ``model`` is a :class:`protlm.convert.Pretrained`, a checkpoint directory, a Hub id, or a preset name with
    ``random_init=True``. ``sequences`` is a FASTA/CSV path, a mapping id -> sequence, or an iterable of
    (id, sequence) pairs or FASTA records. ``options`` are :class:`EmbedOptions` fields.
    """
    kind = "per_residue" if per_residue else "per_protein"
    return {e.id: getattr(e, kind) for e in embed_iter(model, sequences, per_residue=per_residue,
                                                       per_protein=not per_residue, random_init=random_init,
                                                       seed=seed, **options)}


def embed_iter(model, sequences, per_residue: bool = True, per_protein: bool = True, *, random_init: bool = False,
               seed: int = 0, **options) -> Iterator[Embedding]:
    """Yield an :class:`Embedding` per input id as soon as its batch is done (longest sequences first)."""
    opts = EmbedOptions(**options)
    records, _ = _read_records(sequences, opts.bad_records)
    precision = embed_precision(opts)
    pre, copy_model = _load_model(model, random_init, seed, precision)
    run = _Run(pre, opts, copy_model, precision)
    arrays, groups = run.tokenize(records)
    order = list(groups)
    for u, arr in run.embedder.run([arrays[groups[k][0]] for k in order]):
        per_res, per_prot = _outputs(arr, run.single_layer)
        for i in groups[order[u]]:
            oid, seq = records[i]
            yield Embedding(oid, seq, per_res if per_residue else None, per_prot if per_protein else None)


def embed_files(model, sequences=None, per_residue: str | os.PathLike | None = None,
                per_protein: str | os.PathLike | None = None, *, random_init: bool = False, seed: int = 0,
                mkdir: bool = False, progress: bool = True, checkpoint_seconds: float = 30.0,
                store_dtype: str = "float32", **options) -> EmbedSummary:
    """Write per-residue and/or per-protein HDF5 files; resumable, sharded under ``torchrun``.

    ``sequences`` None embeds the bundled example FASTA. Completed work is checkpointed every
    ``checkpoint_seconds``; re-running the same call skips ids already stored. ``store_dtype`` is the on-disk
    dtype (float32 or float16).
    """
    t0 = time.perf_counter()
    opts = EmbedOptions(**options)
    outputs = {k: check_output_path(p, mkdir) for k, p in (("per_residue", per_residue), ("per_protein", per_protein))
               if p is not None}
    if not outputs:
        raise ConfigError("nothing to write: give a per-residue and/or a per-protein output path")
    if len(set(map(os.path.abspath, outputs.values()))) < len(outputs):
        raise ConfigError("the per-residue and per-protein outputs must be different files")
    # HDF5 has no bfloat16: arrays are stored in fp32 or fp16 (the attribute keeps numpy's name)
    store_dtype = {"fp32": "float32", "fp16": "float16"}[canonical(store_dtype, "--store-dtype", ("fp32", "fp16"))]
    records, stats = _read_records(sequences, opts.bad_records)
    # The process group carries only small control messages (the done-list, a barrier, counts), so gloo serves
    # CPUs and GPUs alike and the compute device is chosen here, not by the group; the long timeout lets fast
    # processes wait at the final barrier for slow ones.
    env = init_distributed("cpu", timeout_minutes=48 * 60, backend="gloo")
    rank, world = env.rank, env.world_size
    if world > 1 and (opts.device == "cuda" or (opts.device is None and torch.cuda.is_available())):
        opts.device = f"cuda:{env.local_rank}"  # one GPU per process
    precision = embed_precision(opts)
    pre, copy_model = _load_model(model, random_init, seed, precision)
    run = _Run(pre, opts, copy_model, precision)
    arrays, groups = run.tokenize(records)
    shas = [sequence_sha1(seq) for _, seq in records]

    if rank == 0:
        print(f"protlm embed: {run.precision.describe()}", file=sys.stderr)
    attrs = dict(model=_model_name(pre), layers=run.layers, prefix=run.prefix,
                 dtype=run.precision.name, precision=run.precision.describe(), window=run.embedder.window, overlap=run.embedder.overlap,
                 family=pre.config.protlm_family, model_type=model_type(pre.config), store_dtype=store_dtype, protlm_version=_version())
    writers = {k: EmbeddingWriter(p, {**attrs, "kind": k}, rank, checkpoint_seconds, store_dtype)
               for k, p in outputs.items()}
    summary = EmbedSummary(outputs=outputs, records=len(records), skipped_records=stats.skipped,
                           skip_reasons=dict(stats.reasons or {}), repaired_records=stats.repaired,
                           dtype=run.precision.name)
    try:
        done = _stored(writers, records, shas, outputs, rank)
        keys = _dataset_keys([oid for oid, _ in records], done)
        needs = {i: [k for k in outputs if records[i][0] not in done[k]] for i in range(len(records))}
        summary.already_done = sum(1 for n in needs.values() if not n)
        todo = [key for key, members in groups.items() if any(needs[i] for i in members)]
        summary.windowed = sum(1 for key in todo if len(arrays[groups[key][0]]) > run.embedder.window)
        # shard: longest first, dealt round-robin so every process gets a similar mix of lengths
        todo.sort(key=lambda key: (-len(arrays[groups[key][0]]), groups[key][0]))
        mine = todo[rank::world]
        seqs = [arrays[groups[key][0]] for key in mine]
        batches = run.embedder.plan([len(s) for s in seqs])
        bar = _Progress(sum(u.length for b in batches for u in b), len(mine), progress and rank == 0)
        written = 0

        def on_batch(batch):
            bar.batch_done(sum(u.length for u in batch))
            for w in writers.values():
                if w.maybe_flush() and world == 1:  # with several processes, process 0 merges at the end
                    w.maybe_merge()

        try:
            for u, arr in run.embedder.run(seqs, batches, on_batch=on_batch):
                per_res, per_prot = _outputs(arr, run.single_layer)
                for i in groups[mine[u]]:
                    oid = records[i][0]
                    for k in needs[i]:
                        writers[k].add(oid, keys[oid], per_res if k == "per_residue" else per_prot, shas[i])
                    written += bool(needs[i])
                bar.protein_done()
        finally:
            bar.close()
            for w in writers.values():  # keep every finished protein, also on Ctrl-C or an error
                w.flush()
        barrier()
        if rank == 0:
            for w in writers.values():
                w.merge()
                summary.notes += w.notes
        stats = run.embedder.stats
        counts = dict(embedded=written, unique=len(mine), residues=sum(u.length for b in batches for u in b),
                      fp16_fallbacks=stats.fp16_fallbacks, oom_splits=stats.oom_splits,
                      padded_tokens=stats.padded_tokens, real_tokens=stats.real_tokens)
        gathered = all_gather_object(counts)
        for k in counts:
            setattr(summary, k, sum(c[k] for c in gathered))
    finally:
        for w in writers.values():
            w.close(remove_parts=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _stored(writers: dict[str, EmbeddingWriter], records, shas, outputs, rank: int):
    """What the outputs already hold (process 0 reads, everyone gets the same answer); ids whose sequence
    changed since are an error."""
    done = None
    if rank == 0:
        for w in writers.values():
            w.start()
        done = {k: w.done() for k, w in writers.items()}
    done = broadcast_object(done)
    for k, stored in done.items():
        for i, (oid, _) in enumerate(records):
            if oid in stored and stored[oid][1] and stored[oid][1] != shas[i]:
                raise InputError(f"{outputs[k]}: id {oid!r} is stored with a different sequence than in the "
                                 "input; remove it from the file or use another output path")
    return done


# --- internals -------------------------------------------------------------------------------------------------
class _Run:
    """The model-dependent settings of a run, resolved once."""

    def __init__(self, pre, opts: EmbedOptions, copy_model: bool, precision: Precision | None = None):
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.pre = pre
        self.opts = opts
        device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision or embed_precision(opts)
        self.dtype = self.precision.dtype
        layers = opts.layers
        if isinstance(layers, int):
            layers = [layers]
        self.layers = pre.model.encoder.resolve_layers(layers)
        self.single_layer = len(self.layers) == 1
        self.prefix = resolve_prefix(opts.prefix, pre)
        window = resolve_window(opts.window, getattr(pre.model, "max_residues", None))
        max_tokens = opts.max_tokens or DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cuda"])
        self.embedder = Embedder(pre.model.encoder, pre.tokenizer, self.layers,
                                 None if self.prefix == "none" else self.prefix, self.dtype, device, max_tokens,
                                 window, opts.overlap, opts.max_batch, copy_if_cast=copy_model,
                                 int8=self.precision.name == "int8")

    def tokenize(self, records: list[tuple[str, str]]) -> tuple[list[np.ndarray], dict[bytes, list[int]]]:
        """Residue ids per record, and record indices grouped by identical ids (each group is embedded once)."""
        unknown = "x" if self.opts.bad_records == "x" else "error"
        arrays, groups = [], {}
        for i, (oid, seq) in enumerate(records):
            a = self.pre.tokenizer.residue_array(seq, record=f"record {oid!r}", unknown=unknown)
            arrays.append(a)
            groups.setdefault(hashlib.sha1(a.tobytes()).digest(), []).append(i)
        return arrays, groups


def resolve_prefix(prefix: str, pre) -> str:
    """``auto`` -> the family's prefix (none for families without task tokens); an explicit task token on a
    vocabulary that has none is a one-line error naming the family."""
    if prefix not in ("auto", "nlu", "s2s", "none"):
        raise ConfigError(f"prefix must be auto, nlu, s2s or none; got {prefix!r}")
    if prefix == "auto":
        return PREFIX_BY_FAMILY.get(pre.config.protlm_family, "none")
    if prefix != "none" and not pre.tokenizer.prefix_ids:
        raise ConfigError(f"--prefix {prefix}: this {model_type(pre.config)} model (family {pre.config.protlm_family}, "
                          f"vocabulary {pre.tokenizer.source}) has no task tokens; use --prefix auto or none")
    return prefix


def model_type(config) -> str:
    """The ``model_type`` of the config's ``config.json`` (``t5``, ``esm``): which architecture made the arrays."""
    return config.to_hf_dict()["model_type"]


def _outputs(arr: np.ndarray, single_layer: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n_layers, L, D) -> per-residue and per-protein (masked mean: the array holds residues only)."""
    per_prot = arr.mean(axis=1, dtype=np.float64).astype(np.float32)
    if single_layer:
        return arr[0], per_prot[0]
    return arr, per_prot


def _read_records(sequences, policy: str) -> tuple[list[tuple[str, str]], object]:
    from protlm.data.fasta import RecordError

    try:
        return _read_records_unchecked(sequences, policy)
    except RecordError as err:
        if policy != "error":
            raise
        raise RecordError(f"{err} (--bad-records skip or x skips or repairs such records)") from None


def _read_records_unchecked(sequences, policy: str) -> tuple[list[tuple[str, str]], object]:
    from protlm.data.fasta import BAD_RECORD_POLICIES, ReadStats, read_sequences

    if policy not in BAD_RECORD_POLICIES:
        raise ConfigError(f"bad-record policy must be one of {', '.join(BAD_RECORD_POLICIES)}, got {policy!r}")
    stats = ReadStats()
    if sequences is None:
        from importlib.resources import as_file, files

        with as_file(files("protlm") / "resources" / "example.fasta") as path:
            records = [(r.id, r.sequence) for r in read_sequences(path, policy=policy, stats=stats)]
        source = "example.fasta"
    elif isinstance(sequences, (str, os.PathLike)):
        source = os.fspath(sequences)
        records = [(r.id, r.sequence) for r in read_sequences(source, policy=policy, stats=stats)]
    elif isinstance(sequences, Mapping):
        source = "input"
        records = [(str(k), str(v)) for k, v in sequences.items()]
    elif isinstance(sequences, Iterable):
        source = "input"
        records = []
        for item in sequences:
            if hasattr(item, "sequence") and hasattr(item, "id"):
                records.append((str(item.id), str(item.sequence)))
            else:
                try:
                    oid, seq = item
                except (TypeError, ValueError):
                    raise InputError(f"input item {len(records) + 1}: expected (id, sequence), got {item!r:.60}") from None
                records.append((str(oid), str(seq)))
    else:
        raise InputError(f"cannot read sequences from {type(sequences).__name__}")
    first: dict[str, int] = {}
    for i, (oid, seq) in enumerate(records):
        if oid in first:
            raise InputError(f"{source}: duplicate id {oid!r} (records {first[oid] + 1} and {i + 1}); ids must be unique")
        first[oid] = i
        if not oid:
            raise InputError(f"{source}: record {i + 1} has an empty id")
    if not records:
        raise InputError(f"{source}: no sequences to embed"
                         + (f" ({stats.skipped} bad records skipped)" if stats.skipped else ""))
    return records, stats


def _load_model(model, random_init: bool, seed: int, precision: Precision):
    """(Pretrained, whether it belongs to the caller and must be copied before casting)."""
    if not isinstance(model, (str, os.PathLike)):
        if not hasattr(model, "model") or not hasattr(model, "tokenizer"):
            raise ConfigError(f"model must be a checkpoint path, Hub id, preset or load() result, "
                              f"got {type(model).__name__}")
        return model, True
    return load(model, random_init=random_init, seed=seed, encoder_only=True, dtype=precision.dtype), False


def embed_precision(opts: EmbedOptions) -> Precision:
    """The compute precision of an embedding run (``--dtype`` on the run's device)."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return choose(opts.dtype, device, "inference", option="--dtype", allowed=("auto", "fp32", "bf16", "fp16", "int8"))


def _model_name(pre) -> str:
    return os.path.abspath(pre.source) if os.path.isdir(str(pre.source)) else str(pre.source)


def _dataset_keys(ids: list[str], done: dict[str, dict[str, tuple[str, str]]]) -> dict[str, str]:
    """Dataset names: the safe key, or (when two ids would share it) the safe key plus a hash of the id."""
    stored = {oid: key for d in done.values() for oid, (key, _) in d.items()}
    taken = {key: oid for oid, key in stored.items()}
    by_key: dict[str, list[str]] = {}
    for oid in ids:
        by_key.setdefault(safe_key(oid), []).append(oid)
    out = {}
    for key, members in by_key.items():
        for oid in members:
            if oid in stored:
                out[oid] = stored[oid]
            elif len(members) == 1 and taken.get(key, oid) == oid:
                out[oid] = key
            else:
                out[oid] = f"{key}~{hashlib.sha1(oid.encode()).hexdigest()[:10]}"
    return out


def _version() -> str:
    from protlm import __version__

    return __version__


class _Progress:
    """tqdm over residues (rate and ETA) with a protein count; a no-op when progress is off."""

    def __init__(self, total_residues: int, total_proteins: int, enabled: bool):
        self._done, self._total = 0, total_proteins
        self._bar = None
        if enabled and total_proteins:
            from tqdm import tqdm

            self._bar = tqdm(total=total_residues, unit="res", unit_scale=True, smoothing=0.05, mininterval=1.0,
                             desc="embed", dynamic_ncols=True, postfix=f"0/{total_proteins} proteins")

    def batch_done(self, residues: int) -> None:
        if self._bar is not None:
            self._bar.update(residues)

    def protein_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._done}/{self._total} proteins", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
