"""Where a benchmark's per-residue features come from.

A *source* is one column of the report. It turns a dataset's records into a mapping id -> (L, D) array:

- :class:`OneHotSource`: the one-hot baseline, computed from the sequences (21 channels: the 20 standard residues
  and one for anything else);
- :class:`DirectorySource`: embeddings someone already computed, one HDF5 file per dataset in the format of
  :mod:`protlm.embedding.store`: ``DIR/<dataset>.h5`` (``protlm evaluate --export-fasta`` writes the matching
  ``<dataset>.fasta`` files with the ids the suite expects), or one file for all (``protlm train-head
  --embeddings``); biotrainer's files, keyed by sequence hash, read too;
- :class:`ModelSource`: a model of any family (a T5 or ESM-2 checkpoint, Hub id, or a random-init
  preset/architecture) that protlm embeds with :func:`protlm.embedding.embed_files`. Files are cached under
  ``CACHE/<model key>/<dataset>.layer<L>.<prefix>.h5``; a run embeds only the ids the file lacks, so a quick run's
  embeddings are reused by the full run. The key of a random-init model holds a hash of its whole config (family
  included), the key of a checkpoint a fingerprint of its files, so two models never share a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from protlm.convert import load, read_config
from protlm.config import EsmConfig
from protlm.errors import ConfigError, InputError
from protlm.evaluate.datasets import LabelledRecord
from protlm.precision import choose

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
_ONE_HOT_INDEX = np.full(256, len(STANDARD), dtype=np.int64)
for _i, _aa in enumerate(STANDARD):
    _ONE_HOT_INDEX[ord(_aa)] = _i


def one_hot(sequence: str) -> np.ndarray:
    """(L, 21) float32: the 20 standard residues, then one channel for X and the rare letters."""
    idx = _ONE_HOT_INDEX[np.frombuffer(sequence.upper().encode("ascii"), dtype=np.uint8)]
    out = np.zeros((len(sequence), len(STANDARD) + 1), dtype=np.float32)
    out[np.arange(len(sequence)), idx] = 1.0
    return out


class _OneHotMap(Mapping):
    def __init__(self, records: list[LabelledRecord]):
        self._seqs = {r.id: r.sequence for r in records}

    def __getitem__(self, key: str) -> np.ndarray:
        return one_hot(self._seqs[key])

    def __iter__(self):
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)


@dataclass
class Prepared:
    """A dataset's features for one source: the mapping, where it lives (for messages) and what it cost."""

    arrays: Mapping  # id -> (L, D)
    path: str  # file it was read from, or a description
    seconds: float = 0.0  # embedding time spent in this run (0 when cached)
    embedded: int = 0  # ids embedded in this run
    cpu_seconds: float = 0.0  # the same in CPU time of this process


class FeatureSource:
    """Base class: ``name`` is the report column, ``key`` names results and caches on disk."""

    name: str = ""
    key: str = ""
    baseline: bool = False

    def prepare(self, dataset: str, records: list[LabelledRecord], progress: bool = True) -> Prepared:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "key": self.key}


class OneHotSource(FeatureSource):
    name = "one-hot"
    key = "one-hot"
    baseline = True

    def prepare(self, dataset: str, records: list[LabelledRecord], progress: bool = True) -> Prepared:
        return Prepared(_OneHotMap(records), "one-hot (computed from the sequences)")


class DirectorySource(FeatureSource):
    """Precomputed per-residue embeddings: ``<dir>/<dataset>.h5``, or one file that holds every dataset's
    proteins (``protlm train-head --embeddings FILE``). Proteins are found by id, or in biotrainer's files by the
    hash of their sequence (:class:`protlm.embedding.store.EmbeddingStore`)."""

    def __init__(self, directory: str, name: str | None = None, layer: int | None = None):
        self.directory = os.fspath(directory)
        self.single_file = os.path.isfile(self.directory)
        if not self.single_file and not os.path.isdir(self.directory):
            raise InputError(f"{self.directory}: no such embeddings file or directory")
        stem = os.path.basename(os.path.normpath(self.directory))
        self.name = name or (os.path.splitext(stem)[0] if self.single_file else stem)
        self.key = "dir-" + _safe(self.name) + "-" + _short_hash(os.path.abspath(self.directory))
        self.layer = layer

    def prepare(self, dataset: str, records: list[LabelledRecord], progress: bool = True) -> Prepared:
        from protlm.embedding.store import EmbeddingStore

        path = self.directory if self.single_file else os.path.join(self.directory, f"{dataset}.h5")
        if not os.path.exists(path):
            raise InputError(f"{path}: no embeddings for dataset {dataset!r} (expected one HDF5 file per dataset "
                             f"in {self.directory}; `protlm evaluate --export-fasta DIR` writes the sequences to embed)")
        return Prepared(EmbeddingStore(path, layer=self.layer, sequences={r.id: r.sequence for r in records}), path)

    def describe(self) -> dict:
        where = "file" if self.single_file else "directory"
        return {**super().describe(), where: os.path.abspath(self.directory), "layer": self.layer}


class ModelSource(FeatureSource):
    """A model that protlm embeds with; results are cached per (model, dataset, layer, prefix)."""

    def __init__(self, spec: str, *, random_init_of: str | None = None, name: str | None = None, layer: int = -1,
                 prefix: str = "auto", cache_dir: str, dtype: str = "auto", device: str | None = None,
                 threads: int | None = None, seed: int = 0):
        """``spec`` is a checkpoint directory or Hub id; with ``random_init_of`` set (a preset name or a
        checkpoint whose architecture to copy) the weights are random instead (seed ``seed``)."""
        self.spec = spec
        self.random_init_of = random_init_of
        self.layer = layer
        self.prefix = prefix
        self.cache_dir = cache_dir
        self.dtype = dtype
        self.device = device
        self.threads = threads
        self.seed = seed
        self.baseline = random_init_of is not None
        self._pre = None
        if prefix not in ("auto", "none") and not has_task_tokens(random_init_of or spec):
            raise ConfigError(f"--prefix {prefix}: {_display(random_init_of or spec)} is an ESM-style model, whose "
                              "vocabulary has no task tokens; use --prefix auto or none")
        if random_init_of is not None:
            self.name = name or f"{_display(random_init_of)} (random init)"
            self.key = f"random-init-{_safe(_display(random_init_of))}-{self._config_hash()}-seed{seed}"
        else:
            self.name = name or _display(spec)
            self.key = f"{_safe(_display(spec))}-{_checkpoint_fingerprint(spec)}"
        if prefix != "auto":  # Table 5 reports Ankh3 with [NLU] and with [S2S]: one column each
            self.name += f" [{prefix.upper()}]" if name is None else ""
            self.key += f"-{prefix}"
        self.precision = choose(dtype, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                                "inference", option="--embed-dtype", allowed=("auto", "fp32", "bf16", "fp16", "int8"))
        if self.precision.name != "fp32":  # cached apart from fp32's embeddings (the key of earlier runs)
            self.key += f"-{self.precision.name}"
        if self.precision.name == "int8":  # an approximation: a column of its own
            self.name += " (int8)" if name is None else ""

    def _config_hash(self) -> str:
        return _short_hash(json.dumps(self._config().to_dict(), sort_keys=True))

    def _config(self):
        return read_config(self.random_init_of)[0]

    def pretrained(self):
        if self._pre is None:
            self._pre = load(self.random_init_of if self.baseline else self.spec, random_init=self.baseline,
                             seed=self.seed, encoder_only=True)
        return self._pre

    def path_for(self, dataset: str) -> str:
        return os.path.join(self.cache_dir, self.key, f"{dataset}.layer{self.layer}.{self.prefix}.h5")

    def prepare(self, dataset: str, records: list[LabelledRecord], progress: bool = True) -> Prepared:
        from protlm.embedding import embed_files
        from protlm.embedding.store import EmbeddingStore

        path = self.path_for(dataset)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        have: set[str] = set()
        if os.path.exists(path):
            with EmbeddingStore(path) as store:
                have = set(store.ids())
        todo = {}
        for r in records:
            if r.id not in have:
                todo[r.id] = r.sequence
        seconds = cpu = 0.0
        if todo:
            t0, c0 = time.perf_counter(), time.process_time()
            embed_files(self.pretrained(), todo, per_residue=path, progress=progress, layers=[self.layer],
                        prefix=self.prefix, dtype=self.dtype, device=self.device, threads=self.threads)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Prepared(EmbeddingStore(path), path, seconds, len(todo), cpu)

    def describe(self) -> dict:
        return {**super().describe(), "model": self.spec, "random_init_of": self.random_init_of,
                "layer": self.layer, "prefix": self.prefix, "seed": self.seed if self.baseline else None,
                # only when not fp32, so that units written before precisions were recorded keep their hash
                "embed_precision": None if self.precision.name == "fp32" else self.precision.name}


class FinetuneSource(ModelSource):
    """A model whose backbone trains with each head (``--finetune lora|full``): a column of its own, with no
    embeddings cache; each unit starts from the checkpoint's weights (:mod:`protlm.finetune`)."""

    def __init__(self, spec: str, mode: str, finetune, **kw):
        from protlm.finetune.config import MODE_LABELS

        kw.pop("dtype", None)
        super().__init__(spec, dtype="fp32", **kw)
        self.mode, self.finetune = mode, finetune
        self.name += f" ({MODE_LABELS[mode]})"
        self.key += f"-{mode}-" + _short_hash(json.dumps(self.describe()["finetune"], sort_keys=True))

    def prepare(self, dataset: str, records: list[LabelledRecord], progress: bool = True) -> Prepared:
        raise ConfigError(f"{self.name}: a fine-tuned column computes its features while training; it has no "
                          "embeddings file")

    def features(self, sequences: dict[tuple[str, str], str], device: str):
        """The trainable features of every protein the task uses (see BackboneFeatures)."""
        from protlm.finetune.backbone import BackboneFeatures

        return BackboneFeatures(self.pretrained(), self.mode, self.finetune, sequences, layer=self.layer,
                                prefix=self.prefix, device=device)

    def describe(self) -> dict:
        import dataclasses

        return {**super().describe(), "finetune": {"mode": self.mode, **dataclasses.asdict(self.finetune)}}


def has_task_tokens(spec: str) -> bool:
    """Whether the model ``spec`` names (preset, checkpoint directory or Hub id) may take a task token: T5 models
    may ([NLU], [S2S]); ESM-2 and DPLM have none. Reads only the config."""
    return not isinstance(read_config(spec)[0], EsmConfig)


def _display(spec: str) -> str:
    spec = os.fspath(spec).rstrip("/")
    if os.path.isdir(spec):
        parts = os.path.normpath(os.path.abspath(spec)).split(os.sep)
        # runs/<name>/final reads better as "<name>/final" than as "final"
        return "/".join(parts[-2:]) if parts[-1] in ("final", "latest", "best") or parts[-1].startswith("step") else parts[-1]
    return spec


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _checkpoint_fingerprint(spec: str) -> str:
    """Changes when the checkpoint's weights or config change, so stale cached embeddings are not reused."""
    if not os.path.isdir(spec):
        return _short_hash(spec)
    parts = [os.path.abspath(spec)]
    for name in sorted(os.listdir(spec)):
        if name.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(os.path.join(spec, name))
            parts.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return _short_hash("|".join(parts))


@dataclass
class FeatureSet:
    """The arrays a task needs, by (dataset, id); preloaded into memory when they fit ``budget_bytes``."""

    stores: dict[str, Prepared]
    preloaded: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    dim: int = 0

    def __call__(self, example) -> np.ndarray:
        key = (example.dataset, example.id)
        arr = self.preloaded.get(key)
        if arr is None:
            arr = np.asarray(self.stores[example.dataset].arrays[example.id])
        return arr


def gather_features(stores: dict[str, Prepared], examples_by_split: dict[str, list], task: str,
                    allow_missing: bool, budget_bytes: float = 8e9) -> tuple[FeatureSet, dict[str, list], dict[str, list]]:
    """Check that every example has a per-residue array of its length, then preload what fits.

    Missing ids are counted per split before any training starts: an error listing the count (default), or with
    ``allow_missing`` the examples are dropped. Returns (features, ``{split: [n_missing, n_total]}``, the
    examples kept per split).
    """
    missing: dict[str, list] = {}
    kept: dict[str, list] = {}
    dim = 0
    total_bytes = 0.0
    for split, examples in examples_by_split.items():
        lost = [e for e in examples if e.id not in stores[e.dataset].arrays]
        if lost:
            missing[split] = [len(lost), len(examples)]
            if not allow_missing:
                where = stores[lost[0].dataset].path
                raise InputError(f"{where}: embeddings missing for {len(lost)} of {len(examples)} proteins of task "
                                 f"{task!r} split {split!r} (first: {lost[0].id!r}); embed them, or pass "
                                 "--allow-missing to leave them out and count them in the report")
        lost_ids = {id(e) for e in lost}
        kept[split] = [e for e in examples if id(e) not in lost_ids]
        if not kept[split]:
            raise InputError(f"task {task!r} split {split!r}: no proteins left after dropping those without embeddings")
    # Shapes: check one array per dataset eagerly (cheap) and all of them while preloading.
    all_examples = [e for exs in kept.values() for e in exs]
    unique = {(e.dataset, e.id): e for e in all_examples}
    fs = FeatureSet(stores)
    for (ds, oid), e in unique.items():
        arr = np.asarray(stores[ds].arrays[oid])
        if arr.ndim != 2 or arr.shape[0] != e.length:
            shape = "x".join(map(str, arr.shape))
            raise InputError(f"{stores[ds].path}: embedding of {oid!r} is {shape} but the sequence has {e.length} "
                             "residues; the suite needs per-residue (L, D) embeddings of exactly these sequences")
        if dim and arr.shape[1] != dim:
            raise InputError(f"{stores[ds].path}: embedding of {oid!r} has width {arr.shape[1]}, others {dim}")
        dim = arr.shape[1]
        total_bytes += arr.nbytes
        if total_bytes <= budget_bytes:
            fs.preloaded[(ds, oid)] = arr
    fs.dim = dim
    return fs, missing, kept
