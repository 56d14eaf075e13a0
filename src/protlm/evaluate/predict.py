"""Trained heads on new proteins: embed each protein once, at every layer the heads read, and apply every head.

- :func:`load_heads` reads head bundles (:mod:`protlm.evaluate.bundle`) and checks that they can share one
  embedding pass (one backbone, one prefix);
- :class:`Predictor` embeds a batch of proteins with the embedding engine of ``protlm embed`` (token-budget
  batching, windows for long proteins, identical sequences once), or reads them from a per-residue embeddings
  file, and runs each head through the same code that scored it in ``protlm evaluate``
  (:func:`protlm.evaluate.training.head_outputs`), so a head predicts here what it predicted there;
- a head trained with a fine-tuned backbone (``meta.finetune``: LoRA or full fine-tuning) reads the embeddings
  of its own backbone, the base model with the bundle's adapter merged or trained weights loaded
  (:func:`finetuned_backbone`); :func:`export_backbone` writes that backbone as a checkpoint;
- :func:`predict` is the library entry point (``protlm.predict``); ``protlm predict`` adds TSV/HDF5 files and
  resume on top (:mod:`protlm.cli.predict`).

Outputs per protein and head (:class:`HeadOutput`): a per-residue head gives its string of predicted classes and
(L, C) probabilities, a per-protein classifier its label and (C,) probabilities, a regression head its value, a
contact head its top-L residue pairs (:func:`top_contacts`) and the (L, L) contact probabilities.
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
from protlm.evaluate.metrics import CONTACT_RANGES
from protlm.evaluate.tasks import TaskExample
from protlm.evaluate.training import HeadTrainConfig, head_outputs

ONE_HOT = "one-hot"
PART_PROTEINS = 256  # proteins per part: what is held in memory at once, and the unit of resume
PART_RESIDUES = 65536  # ... or this many residues, whichever comes first


@dataclass
class HeadOutput:
    """One head's prediction for one protein."""

    # per residue: the class of each residue, joined; per protein: the label or the value; contacts: the top-L
    # pairs as "i,j,p;i,j,p;..." (1-based residues, i < j, most likely first; see top_contacts)
    prediction: str | float
    probabilities: np.ndarray | None  # (L, C) per residue, (C,) per protein, (L, L) contacts, float32; None for regression


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


def identity(b: dict[str, Any]) -> dict[str, Any]:
    """A bundle's backbone with a stored-embeddings file's source string read as what it names: heads trained on
    embeddings of a random-init twin record the file's ``model`` attribute, ``"random-init <spec> seed=<n>"``."""
    model = b.get("model")
    if isinstance(model, str) and model.startswith("random-init ") and " seed=" in model and not b.get("random_init"):
        return {**b, **_named(model)}
    return b


def describe_backbone(b: dict[str, Any]) -> str:
    b = identity(b)
    if b.get("model") is None:
        return "embeddings of an unnamed model (a file without a 'model' attribute)"
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

    theirs, mine = identity(theirs), identity(mine)
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


def feature_key(bundle: HeadBundle) -> Any:
    """Where a head finds its embeddings among a record's arrays (:meth:`Predictor.embed`): its layer for a
    frozen backbone (the base model's pass, or stored embeddings), ``(bundle path, layer)`` for a fine-tuned one."""
    return bundle.meta.layer if bundle.meta.finetune is None else (bundle.path, bundle.meta.layer)


def backbone_groups(model_heads: list[HeadBundle]) -> dict[str | None, list[HeadBundle]]:
    """Model heads by the backbone that embeds for them: ``None`` (the base model as it is) for the frozen heads,
    the bundle path for each fine-tuned head (its backbone is its own)."""
    groups: dict[str | None, list[HeadBundle]] = {}
    for b in model_heads:
        groups.setdefault(None if b.meta.finetune is None else b.path, []).append(b)
    return groups


def load_dtype(bundles: list[HeadBundle]) -> str | None:
    """The dtype to load the base model in for these heads: the embedding dtype all their backbones compute in,
    or None (the stored weights, cast per backbone) when they differ, e.g. frozen bf16 heads beside a fine-tuned
    head, whose backbone trained in fp32 and must be applied to the base weights as stored."""
    model_heads = [b for b in bundles if b.meta.backbone.get("model") != ONE_HOT]
    values = {shared_setting(members, "embed_dtype") or "auto" for members in backbone_groups(model_heads).values()}
    return values.pop() if len(values) == 1 else ("auto" if not values else None)


def finetuned_backbone(pretrained, bundle: HeadBundle):
    """A copy of ``pretrained`` (in fp32, as the backbone trained) with the fine-tuned backbone of ``bundle``
    applied: its LoRA adapter merged into the weights, or its trained weights loaded. ``pretrained`` is unchanged;
    the copy is a whole model more in memory, on the base's device."""
    import copy
    import dataclasses

    from protlm.finetune.backbone import apply_finetune

    model = copy.deepcopy(pretrained.model).float()
    return apply_finetune(dataclasses.replace(pretrained, model=model, precision=None), bundle.path,
                          bundle.meta.finetune)


def export_backbone(bundle: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None) -> str:
    """Write the fine-tuned backbone of the head bundle ``bundle`` as a checkpoint in ``out_dir``
    (``protlm.convert.save_pretrained``: what ``protlm.load`` and transformers' ``from_pretrained`` read), in fp32.

    The base is ``model`` (a checkpoint directory or Hub id), by default the one the bundle records; a base of
    another config than the bundle's is refused. A LoRA adapter is merged into the base weights, trained weights
    replace the base's. The checkpoint holds what the base holds (the T5 decoder, the LM head), except for a
    random-init base: its random draw of the encoder alone (what the head trained on) is written, encoder-only.
    Returns ``out_dir``.
    """
    from protlm.convert import load, read_config, save_pretrained
    from protlm.evaluate.bundle import read_meta
    from protlm.finetune.backbone import apply_finetune

    bundle = os.fspath(bundle)
    meta = read_meta(bundle)
    theirs = meta.backbone
    if meta.finetune is None:
        raise ConfigError(f"{bundle}: head {meta.task!r} was trained on a frozen backbone; there is no fine-tuned "
                          f"backbone to export (its backbone is {describe_backbone(theirs)} as it is)")
    spec = model or str(theirs.get("model"))
    random_init = bool(theirs.get("random_init"))
    seed = int(theirs.get("init_seed") or 0)
    mine = {"model": model_name(spec), "random_init": random_init, "init_seed": seed,
            "config_hash": config_hash(read_config(spec)[0])}
    if theirs.get("config_hash") not in (None, mine["config_hash"]):
        raise CheckpointError(f"{bundle}: head {meta.task!r} was fine-tuned from {describe_backbone(theirs)}, but "
                              f"the base given is {describe_backbone(mine)}, another config; give --model the base "
                              "it was trained from")
    # a random-init draw of the encoder alone differs from the whole model's: load the twin the head trained on
    pre = load(spec, random_init=random_init, seed=seed, encoder_only=True if random_init else None,
               dtype=torch.float32)
    entry = meta.finetune
    if entry.get("mode") == "lora":
        from protlm.finetune.lora import export_merged

        return export_merged(pre, os.path.join(bundle, str(entry.get("path"))), out_dir)
    apply_finetune(pre, bundle, entry)
    return save_pretrained(pre.model, out_dir, pre.tokenizer)


class Predictor:
    """Applies ``bundles`` to proteins; embeddings come from ``pretrained`` (a :class:`protlm.convert.Pretrained`)
    or from stored per-residue embeddings handed to :meth:`apply` (see :func:`stored_features`). ``embed`` holds
    :class:`protlm.embedding.EmbedOptions` fields (window, max_tokens, dtype, device, ...); the dtype defaults to
    the one the heads' embeddings were computed in.

    Heads of a fine-tuned backbone (``meta.finetune``) read the embeddings of their own backbone: a copy of
    ``pretrained`` with the bundle's adapter merged or trained weights loaded (:func:`finetuned_backbone`). Each
    distinct backbone embeds a protein once, for all of its heads; frozen heads share ``pretrained``'s pass.
    """

    def __init__(self, bundles: list[HeadBundle], pretrained=None, device: str = "cpu", **embed: Any):
        self.bundles = bundles
        self.names = head_names(bundles)
        self.device = torch.device(device)
        self.eval_tokens = HeadTrainConfig().eval_tokens
        for b in bundles:
            b.head.to(self.device).eval()
        self.model_heads = [b for b in bundles if b.meta.backbone.get("model") != ONE_HOT]
        self.layers = sorted({b.meta.layer for b in self.model_heads})
        self._runs: list[tuple[Any, Any]] = []  # (backbone: None for pretrained itself or a bundle path, _Run)
        if pretrained is not None and self.model_heads:
            from protlm.embedding.run import EmbedOptions, _Run, embed_precision

            check_backbone(self.model_heads, backbone_of(pretrained))
            dtype = embed.pop("dtype", None)
            embed_device = embed.pop("embed_device", None) or str(self.device)
            for backbone, members in backbone_groups(self.model_heads).items():
                opts = EmbedOptions(layers=sorted({b.meta.layer for b in members}),
                                    prefix=shared_setting(members, "prefix"),
                                    dtype=dtype or shared_setting(members, "embed_dtype") or "auto",
                                    device=embed_device, **embed)
                # the caller's model is cast on a copy; a fine-tuned copy is ours to cast
                pre = pretrained if backbone is None else finetuned_backbone(pretrained, members[0])
                self._runs.append((backbone, _Run(pre, opts, copy_model=backbone is None,
                                                  precision=embed_precision(opts))))

    @property
    def precision(self) -> str:
        if not self._runs:
            return "stored embeddings"
        text = "; ".join(dict.fromkeys(run.precision.describe() for _, run in self._runs))
        tuned = sum(backbone is not None for backbone, _ in self._runs)
        return text + (f" ({tuned} fine-tuned backbone{'s' if tuned > 1 else ''})" if tuned else "")

    # --- embeddings -------------------------------------------------------------------------------------------
    def embed(self, records: list[tuple[str, str]]) -> list[dict[Any, np.ndarray]]:
        """Per record, its (L, D) float32 arrays under :func:`feature_key`: ``layer`` for the base model's
        embeddings, ``(bundle path, layer)`` for a fine-tuned backbone's. Each distinct sequence is embedded once
        per backbone."""
        if not self._runs:
            if self.model_heads:
                raise ConfigError("these heads read model embeddings: give MODEL (or stored embeddings)")
            return [{} for _ in records]
        out: list[dict[Any, np.ndarray]] = [{} for _ in records]
        for backbone, run in self._runs:
            arrays, groups = run.tokenize(records)
            order = list(groups)
            for u, arr in run.embedder.run([arrays[groups[k][0]] for k in order]):
                layers = {layer if backbone is None else (backbone, layer): a for layer, a in zip(run.layers, arr)}
                for i in groups[order[u]]:
                    out[i].update(layers)
        return out

    # --- heads ------------------------------------------------------------------------------------------------
    def apply(self, records: list[tuple[str, str]], features: list[dict[Any, np.ndarray]]) -> list[Prediction]:
        """Every head on every record, given each record's arrays under :func:`feature_key` (by layer, for heads
        of a frozen backbone)."""
        preds = [Prediction(oid, seq, {}) for oid, seq in records]
        for name, b in zip(self.names, self.bundles):
            meta = b.meta
            examples = [TaskExample(str(i), "", len(seq), _placeholder(meta.kind, len(seq)), keep=_crop(len(seq), meta.max_length))
                        for i, (_, seq) in enumerate(records)]
            if meta.backbone.get("model") == ONE_HOT:
                lookup = lambda e: one_hot(records[int(e.id)][1])
            else:
                lookup = lambda e, key=feature_key(b): features[int(e.id)][key]
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
    if kind == "contact":
        return np.zeros((length, length), dtype=np.int8)
    return 0.0 if kind == "protein_regression" else 0


def _crop(length: int, max_length: int | None) -> np.ndarray | None:
    """The residues a per-protein head with ``max_length`` sees: the first and last halves (as in training)."""
    if max_length is None or length <= max_length:
        return None
    head = max_length // 2
    return np.concatenate([np.arange(head), np.arange(length - (max_length - head), length)])


def top_contacts(probabilities: np.ndarray, k: int | None = None,
                 min_separation: int = CONTACT_RANGES["all"][0]) -> list[tuple[int, int, float]]:
    """The ``k`` (default L) most likely contacts of an (L, L) probability map among pairs at least
    ``min_separation`` apart in sequence (6: the pairs the contact metrics score), most likely first (ties in
    sequence order): ``(i, j, probability)`` with 1-based residues, i < j."""
    n = probabilities.shape[0]
    i, j = np.triu_indices(n, k=max(1, min_separation))
    p = probabilities[i, j]
    order = np.argsort(-p, kind="stable")[: n if k is None else k]
    return [(int(i[o]) + 1, int(j[o]) + 1, float(p[o])) for o in order]


def _output(meta, logits: torch.Tensor) -> HeadOutput:
    if meta.kind == "contact":
        probs = torch.sigmoid(logits).numpy().astype(np.float32)
        return HeadOutput(";".join(f"{i},{j},{p:.3f}" for i, j, p in top_contacts(probs)), probs)
    if meta.kind == "protein_regression":
        return HeadOutput(float(logits) * meta.target_scale + meta.target_shift, None)
    if meta.kind == "protein_multilabel":  # independent classes: each one present above probability 1/2
        probs = torch.sigmoid(logits).numpy().astype(np.float32)
        return HeadOutput(",".join(c for c, p in zip(meta.classes, probs) if p > 0.5), probs)
    probs = torch.softmax(logits, dim=-1).numpy().astype(np.float32)
    best = probs.argmax(-1)
    if meta.kind == "residue_classification":
        if all(len(c) == 1 for c in meta.classes) and len(best):  # one character per residue: one numpy view
            letters = np.asarray(meta.classes, dtype="<U1")[best]
            return HeadOutput(str(letters.view(f"<U{len(letters)}")[0]), probs)
        return HeadOutput(" ".join(meta.classes[i] for i in best), probs)
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
    --per-residue``, or biotrainer's file keyed by sequence hash). Without ``records`` every protein in the file
    is predicted. Returns (records, read), where
    ``read(oid)`` gives layer -> (L, D)."""
    from protlm.embedding.store import EmbeddingStore

    for b in bundles:
        if b.meta.finetune is not None:
            mode = b.meta.finetune.get("mode")
            raise ConfigError(f"{b.path}: head {b.meta.task!r} reads a fine-tuned backbone ({mode}); stored "
                              f"embeddings were not made by it: give MODEL, the base it was fine-tuned from "
                              f"({describe_backbone(b.meta.backbone)})")
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
    sequences = dict(records) if records is not None else None  # biotrainer's files: found by sequence hash
    stores = {layer: EmbeddingStore(path, layer=layer if stored_layers is not None else None, sequences=sequences)
              for layer in layers}
    first = next(iter(stores.values()), None) or EmbeddingStore(path, sequences=sequences)
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
    heads must have been trained on it (fine-tuned heads: it is their base, each applies its own backbone to a
    copy). ``embed`` takes :class:`protlm.embedding.EmbedOptions` fields.
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
    (per-residue heads: comma-separated per residue, 3 decimals); a contact head's one column holds its top-L
    pairs (``i,j,p`` triples joined by ``;``)."""
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
            if b.meta.kind == "contact":
                continue
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
    (L, C) or (C,) probabilities, the (L, L) contact probabilities, or the value of a regression head."""
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
