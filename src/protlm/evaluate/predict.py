"""Trained heads on new proteins: embed each protein once, at every layer the heads read, and apply every head.

- :func:`load_heads` reads head bundles (:mod:`protlm.evaluate.bundle`) and checks that they can share one
  embedding pass (one backbone, one prefix);
- :class:`Predictor` embeds a batch of proteins with the embedding engine of ``protlm embed`` (token-budget
  batching, windows for long proteins, identical sequences once), or reads them from a per-residue embeddings
  file, and runs each head through the same code that scored it in ``protlm evaluate``
  (:func:`protlm.evaluate.training.head_outputs`), so a head predicts here what it predicted there;
- :func:`predict` is the library entry point (``protlm.predict``); ``protlm predict`` adds TSV/HDF5 files and
  resume on top (:mod:`protlm.cli.predict`).

Outputs per protein and head (:class:`HeadOutput`): a per-residue head gives its string of predicted classes and
(L, C) probabilities, a per-protein classifier its label and (C,) probabilities, a regression head its value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protlm.errors import CheckpointError, ConfigError, InputError
from protlm.evaluate.bundle import HeadBundle, config_hash, load_bundle, model_name
from protlm.evaluate.embeddings import one_hot
from protlm.evaluate.tasks import TaskExample
from protlm.evaluate.training import HeadTrainConfig, head_outputs

ONE_HOT = "one-hot"
PART_PROTEINS = 256  # proteins per part: what is held in memory at once, and the unit of resume
PART_RESIDUES = 65536  # ... or this many residues, whichever comes first


@dataclass
class HeadOutput:
    """One head's prediction for one protein."""

    prediction: str | float  # per residue: the class of each residue, joined; per protein: the label or the value
    probabilities: np.ndarray | None  # (L, C) per residue, (C,) per protein, float32; None for regression


@dataclass
class Prediction:
    id: str
    sequence: str
    heads: dict[str, HeadOutput]  # head name -> output, in the order of the heads


def load_heads(paths: Iterable[str | os.PathLike | HeadBundle]) -> list[HeadBundle]:
    """Bundles from directories: a bundle itself, or a folder whose sub-folders are bundles (``OUT/heads/<source>``,
    a ``--keep-heads all`` folder of seeds). Heads get unique names: the task, plus the folder where tasks repeat."""
    bundles: list[HeadBundle] = []
    for item in paths:
        if isinstance(item, HeadBundle):
            bundles.append(item)
            continue
        path = os.fspath(item)
        if os.path.isfile(os.path.join(path, "head.json")) or not os.path.isdir(path):
            bundles.append(load_bundle(path))
            continue
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "head.json")))
        if not subs:
            raise CheckpointError(f"{path}: not a head bundle (no head.json) and holds none")
        bundles += [load_bundle(os.path.join(path, d)) for d in subs]
    if not bundles:
        raise ConfigError("no heads given")
    for b in bundles:
        if b.meta.kind == "contact":
            raise CheckpointError(f"{b.path}: a contact head; predict applies per-residue and per-protein heads")
    return bundles


def head_names(bundles: list[HeadBundle]) -> list[str]:
    """A column name per head: its task, with the bundle folder added where two heads share a task."""
    tasks = [b.meta.task for b in bundles]
    names = [t if tasks.count(t) == 1 else f"{t}.{os.path.basename(os.path.normpath(b.path))}"
             for t, b in zip(tasks, bundles)]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two heads would both be named {dup!r}; give each bundle once")
    return names


def backbone_of(pre) -> dict[str, Any]:
    """The identity of a loaded model, as a bundle's ``backbone`` records it."""
    return {**_named(str(pre.source)), "config_hash": config_hash(pre.config)}


def _named(source: str) -> dict[str, Any]:
    """Identity from a model's source string (``Pretrained.source``, an embeddings file's ``model``)."""
    if source.startswith("random-init "):  # "random-init <spec> seed=<n>"
        spec, _, seed = source[len("random-init "):].rpartition(" seed=")
        return {"model": model_name(spec), "random_init": True, "init_seed": int(seed)}
    return {"model": model_name(source), "random_init": False}


def backbone_of_spec(spec: str, random_init: bool = False, seed: int = 0) -> dict[str, Any]:
    """The identity of a model argument, from its config alone (checked before the weights are loaded)."""
    from protlm.convert import read_config

    return {"model": model_name(spec), "random_init": random_init, "init_seed": seed if random_init else None,
            "config_hash": config_hash(read_config(spec)[0])}


def describe_backbone(b: dict[str, Any]) -> str:
    text = str(b.get("model"))
    if b.get("random_init"):
        text += f" (random init, seed {b.get('init_seed')})"
    if b.get("config_hash"):
        text += f" [config {str(b['config_hash'])[:10]}]"
    return text


def check_backbone(bundles: list[HeadBundle], mine: dict[str, Any]) -> None:
    """Every head that reads model embeddings must have been trained on the model ``mine`` identifies
    (:func:`backbone_of`): same model, same config, and for a random-init twin the same seed."""
    for b in bundles:
        theirs = b.meta.backbone
        if theirs.get("model") != ONE_HOT and not same_backbone(theirs, mine):
            raise CheckpointError(f"{b.path}: head {b.meta.task!r} was trained on {describe_backbone(theirs)}, "
                                  f"but MODEL is {describe_backbone(mine)}; give the model the head was trained on")


def same_backbone(theirs: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Same model name, same random-init seed if any, and the same config where both sides know it."""
    def name(b: dict[str, Any]) -> tuple:
        return b.get("model"), bool(b.get("random_init")), b.get("init_seed") if b.get("random_init") else None

    hashes = theirs.get("config_hash"), mine.get("config_hash")
    return name(theirs) == name(mine) and (None in hashes or hashes[0] == hashes[1])


def shared_setting(bundles: list[HeadBundle], field: str) -> Any:
    """A backbone setting that all model heads must agree on (one embedding pass): their common value."""
    values = {}
    for b in bundles:
        if b.meta.backbone.get("model") != ONE_HOT:
            value = getattr(b.meta, field) if hasattr(b.meta, field) else b.meta.backbone.get(field)
            values.setdefault(value, b.path)
    if len(values) > 1:
        (v1, p1), (v2, p2) = list(values.items())[:2]
        raise ConfigError(f"heads need different {field}s ({p1}: {v1}, {p2}: {v2}); run predict once per {field}")
    return next(iter(values), None)


class Predictor:
    """Applies ``bundles`` to proteins; embeddings come from ``pretrained`` (a :class:`protlm.convert.Pretrained`)
    or from stored per-residue embeddings handed to :meth:`apply` (see :func:`stored_features`). ``embed`` holds
    :class:`protlm.embedding.EmbedOptions` fields (window, max_tokens, dtype, device, ...); the dtype defaults to
    the one the heads' embeddings were computed in."""

    def __init__(self, bundles: list[HeadBundle], pretrained=None, device: str = "cpu", **embed: Any):
        self.bundles = bundles
        self.names = head_names(bundles)
        self.device = torch.device(device)
        self.eval_tokens = HeadTrainConfig().eval_tokens
        for b in bundles:
            b.head.to(self.device).eval()
        self.model_heads = [b for b in bundles if b.meta.backbone.get("model") != ONE_HOT]
        self.layers = sorted({b.meta.layer for b in self.model_heads})
        self._run = None
        if pretrained is not None and self.model_heads:
            from protlm.embedding.run import EmbedOptions, _Run, embed_precision

            check_backbone(self.model_heads, backbone_of(pretrained))
            prefix = shared_setting(self.model_heads, "prefix")
            dtype = embed.pop("dtype", None) or shared_setting(self.model_heads, "embed_dtype") or "auto"
            opts = EmbedOptions(layers=self.layers, prefix=prefix, dtype=dtype,
                                device=embed.pop("embed_device", None) or str(self.device), **embed)
            self._run = _Run(pretrained, opts, copy_model=True, precision=embed_precision(opts))

    @property
    def precision(self) -> str:
        return self._run.precision.describe() if self._run is not None else "stored embeddings"

    # --- embeddings -------------------------------------------------------------------------------------------
    def embed(self, records: list[tuple[str, str]]) -> list[dict[int, np.ndarray]]:
        """Per record, layer -> (L, D) float32, each distinct sequence embedded once."""
        if self._run is None:
            if self.model_heads:
                raise ConfigError("these heads read model embeddings: give MODEL (or stored embeddings)")
            return [{} for _ in records]
        arrays, groups = self._run.tokenize(records)
        order = list(groups)
        out: list[dict[int, np.ndarray]] = [{} for _ in records]
        for u, arr in self._run.embedder.run([arrays[groups[k][0]] for k in order]):
            layers = dict(zip(self._run.layers, arr))
            for i in groups[order[u]]:
                out[i] = layers
        return out

    # --- heads ------------------------------------------------------------------------------------------------
    def apply(self, records: list[tuple[str, str]], features: list[dict[int, np.ndarray]]) -> list[Prediction]:
        """Every head on every record, given each record's arrays by layer."""
        preds = [Prediction(oid, seq, {}) for oid, seq in records]
        for name, b in zip(self.names, self.bundles):
            meta = b.meta
            examples = [TaskExample(str(i), "", len(seq), _placeholder(meta.kind, len(seq)), keep=_crop(len(seq), meta.max_length))
                        for i, (_, seq) in enumerate(records)]
            if meta.backbone.get("model") == ONE_HOT:
                lookup = lambda e: one_hot(records[int(e.id)][1])
            else:
                lookup = lambda e, layer=meta.layer: features[int(e.id)][layer]
            width = lookup(examples[0]).shape[-1] if examples else meta.in_dim
            if width != meta.in_dim:
                raise CheckpointError(f"{b.path}: head {meta.task!r} reads {meta.in_dim}-wide embeddings, these "
                                      f"are {width} wide")
            for e, logits in zip(examples, head_outputs(b.head, examples, lookup, self.eval_tokens, self.device)):
                preds[int(e.id)].heads[name] = _output(meta, logits)
        return preds

    def predict(self, records: list[tuple[str, str]]) -> list[Prediction]:
        return self.apply(records, self.embed(records))


def _placeholder(kind: str, length: int):
    """A target of the right shape: the head-running code builds (unused) targets next to the inputs."""
    if kind == "residue_classification":
        return np.zeros(length, dtype=np.int64)
    return 0.0 if kind == "protein_regression" else 0


def _crop(length: int, max_length: int | None) -> np.ndarray | None:
    """The residues a per-protein head with ``max_length`` sees: the first and last halves (as in training)."""
    if max_length is None or length <= max_length:
        return None
    head = max_length // 2
    return np.concatenate([np.arange(head), np.arange(length - (max_length - head), length)])


def _output(meta, logits: torch.Tensor) -> HeadOutput:
    if meta.kind == "protein_regression":
        return HeadOutput(float(logits) * meta.target_scale + meta.target_shift, None)
    if meta.kind == "protein_multilabel":  # independent classes: each one present above probability 1/2
        probs = torch.sigmoid(logits).numpy().astype(np.float32)
        return HeadOutput(",".join(c for c, p in zip(meta.classes, probs) if p > 0.5), probs)
    probs = torch.softmax(logits, dim=-1).numpy().astype(np.float32)
    best = probs.argmax(-1)
    if meta.kind == "residue_classification":
        sep = "" if all(len(c) == 1 for c in meta.classes) else " "
        return HeadOutput(sep.join(meta.classes[i] for i in best), probs)
    return HeadOutput(meta.classes[int(best)], probs)


def parts(records: list[tuple[str, str]], start: int = 0) -> Iterable[tuple[int, list[tuple[str, str]]]]:
    """(index of the first record, records) in input order, from ``start``: at most PART_PROTEINS proteins or
    PART_RESIDUES residues each (one protein at least)."""
    i = start
    while i < len(records):
        j, residues = i, 0
        while j < len(records) and j - i < PART_PROTEINS and (j == i or residues + len(records[j][1]) <= PART_RESIDUES):
            residues += len(records[j][1])
            j += 1
        yield i, records[i:j]
        i = j


def stored_features(path: str, records: list[tuple[str, str]] | None, bundles: list[HeadBundle],
                    allow_missing: bool = False) -> tuple[list[tuple[str, str]], Any]:
    """Records and a feature reader for per-residue embeddings stored in ``path`` (``protlm embed
    --per-residue``). Without ``records`` every protein in the file is predicted. Returns (records, read), where
    ``read(oid)`` gives layer -> (L, D)."""
    from protlm.embedding.store import EmbeddingStore

    model_heads = [b for b in bundles if b.meta.backbone.get("model") != ONE_HOT]
    layers = sorted({b.meta.layer for b in model_heads})
    with EmbeddingStore(path) as probe:
        attrs, stored_layers = probe.attrs, probe.layers
    kind = attrs.get("kind")
    if kind not in (None, "per_residue"):
        raise InputError(f"{path}: holds {kind} embeddings; heads need per-residue ones (protlm embed --per-residue)")
    for b in model_heads:
        theirs = b.meta.backbone
        if attrs.get("model") is not None and not same_backbone(theirs, _named(str(attrs["model"]))):
            raise CheckpointError(f"{b.path}: head {b.meta.task!r} was trained on {describe_backbone(theirs)}, but "
                                  f"{path} holds embeddings of {describe_backbone(_named(str(attrs['model'])))}")
        if stored_layers is not None and b.meta.layer not in stored_layers:
            raise InputError(f"{path}: head {b.meta.task!r} reads layer {b.meta.layer}, the file holds layers "
                             f"{stored_layers}")
        if attrs.get("prefix") not in (None, b.meta.prefix):
            raise InputError(f"{path}: embedded with prefix {attrs['prefix']}, head {b.meta.task!r} with {b.meta.prefix}")
    stores = {layer: EmbeddingStore(path, layer=layer if stored_layers is not None else None) for layer in layers}
    first = next(iter(stores.values()), None) or EmbeddingStore(path)
    if records is None:
        if any(b.meta.backbone.get("model") == ONE_HOT for b in bundles):
            raise InputError("one-hot heads need the sequences: give the FASTA file with --embeddings")
        records = [(oid, "X" * first[oid].shape[-2]) for oid in first.ids()]
    else:
        lost = [oid for oid, _ in records if oid not in first]
        if lost and not allow_missing:
            raise InputError(f"{path}: no embedding for {len(lost)} of {len(records)} proteins (first: {lost[0]!r}); "
                             "embed them, or pass --allow-missing to leave them out")
        records = [r for r in records if r[0] in first]
        if not records:
            raise InputError(f"{path}: none of the input proteins has an embedding here")

    def read(oid: str, length: int) -> dict[int, np.ndarray]:
        out = {}
        for layer, store in stores.items():
            arr = np.asarray(store[oid], dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != length:
                raise InputError(f"{path}: embedding of {oid!r} is {'x'.join(map(str, arr.shape))}, but the sequence "
                                 f"has {length} residues")
            out[layer] = arr
        return out

    return records, read


def predict(pretrained, heads, sequences, *, device: str = "cpu", **embed: Any) -> dict[str, dict[str, HeadOutput]]:
    """``{id: {head name: HeadOutput}}`` for ``sequences`` (a FASTA path, a mapping id -> sequence, or (id,
    sequence) pairs), with the head bundles ``heads`` (directories or loaded :class:`HeadBundle`).

    ``pretrained`` is a :class:`protlm.convert.Pretrained` (or a checkpoint directory / Hub id, loaded here); the
    heads must have been trained on it. ``embed`` takes :class:`protlm.embedding.EmbedOptions` fields.
    """
    from protlm.embedding.run import _read_records

    bundles = load_heads(heads if isinstance(heads, (list, tuple)) else [heads])
    if isinstance(pretrained, (str, os.PathLike)):
        from protlm.convert import load

        pretrained = load(pretrained, encoder_only=True)
    records, _ = _read_records(sequences, embed.pop("bad_records", "error"))
    predictor = Predictor(bundles, pretrained, device=device, **embed)
    out: dict[str, dict[str, HeadOutput]] = {}
    for _, part in parts(records):
        for p in predictor.predict(part):
            out[p.id] = p.heads
    return out


# --- files ----------------------------------------------------------------------------------------------------
def tsv_header(predictor: Predictor) -> str:
    """Columns: id, length, then per head its prediction and, for classifiers, one probability column per class
    (per-residue heads: comma-separated per residue, 3 decimals)."""
    cols = ["id", "length"]
    for name, b in zip(predictor.names, predictor.bundles):
        cols.append(name)
        cols += [f"{name}:p({c})" for c in (b.meta.classes or [])] if b.meta.kind != "protein_regression" else []
    return "\t".join(cols) + "\n"


def tsv_rows(predictor: Predictor, preds: list[Prediction]) -> str:
    lines = []
    for p in preds:
        cells = [p.id, str(len(p.sequence))]
        for name, b in zip(predictor.names, predictor.bundles):
            out = p.heads[name]
            if b.meta.kind == "protein_regression":
                cells.append(f"{out.prediction:.6g}")
                continue
            cells.append(str(out.prediction))
            if b.meta.kind == "residue_classification":
                fmt = ",".join(["%.3f"] * len(out.probabilities))  # one % over a tuple: 3x np.char.mod's speed
                cells += [fmt % tuple(col) for col in out.probabilities.T.tolist()]
            else:
                cells += [f"{v:.4f}" for v in out.probabilities]
        lines.append("\t".join(cells))
    return "".join(line + "\n" for line in lines)


def write_h5(path: str, predictor: Predictor, preds: list[Prediction]) -> None:
    """Probabilities in HDF5, written whole and atomically: a group per head (attributes ``task``, ``kind``,
    ``classes``, ``head``), in it a dataset per protein named by its safe key with ``attrs["original_id"]``:
    (L, C) or (C,) probabilities, or the value of a regression head."""
    import h5py

    from protlm.embedding.store import safe_key
    from protlm.utils import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["kind"] = "predictions"
            for name, b in zip(predictor.names, predictor.bundles):
                g = fh.create_group(safe_key(name))
                g.attrs.update({"task": b.meta.task, "kind": b.meta.kind, "head": os.path.abspath(b.path)})
                if b.meta.classes:
                    g.attrs["classes"] = np.array(b.meta.classes, dtype=h5py.string_dtype())
                for p in preds:
                    out = p.heads[name]
                    data = np.float32(out.prediction) if out.probabilities is None else out.probabilities
                    key = safe_key(p.id)
                    if key in g:  # two ids with one safe key (a/b and a_b): the later one gets a suffix
                        key = f"{key}~{sum(1 for k in g if k.startswith(key))}"
                    g.create_dataset(key, data=data).attrs["original_id"] = p.id


def merge_h5(path: str, part_files: list[str]) -> None:
    """One file from the part files of a run (same groups in each), written atomically."""
    import h5py

    from protlm.utils import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs["kind"] = "predictions"
            for part in part_files:
                with h5py.File(part, "r") as fh:
                    for gname, g in fh.items():
                        if gname not in out:
                            dst = out.create_group(gname)
                            dst.attrs.update(dict(g.attrs))
                        dst = out[gname]
                        for key, ds in g.items():
                            name = key if key not in dst else f"{key}~{sum(1 for k in dst if k.startswith(key))}"
                            fh.copy(ds, dst, name=name)
