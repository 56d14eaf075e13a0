"""Head bundles: a trained head as two files that rebuild it anywhere (``protlm predict``, ``protlm.predict``).

A bundle is a directory holding ``head.safetensors`` (the head's tensors under their ``state_dict`` names) and
``head.json`` (:class:`HeadMeta`: what the head predicts, from which embeddings, how to rebuild it, and what it
scored). Format in docs/formats.md, "Head bundles".

Head types: the JSON names the head's type and the keyword config its builder takes, and :data:`HEAD_TYPES` maps
each type to that builder, so a new kind of head (a linear layer, a small CNN or MLP) is one
:func:`register_head_type` call and no change to the format. Every registered head follows the ConvBERT head's
calling convention: ``head(x (B, L, in_dim), mask (B, L) bool) -> logits`` ((B, L, C) per residue, (B, C) or
(B,) per protein), and has a ``kind`` attribute; per-protein heads pool the residues themselves.

Loading accounts for every tensor, as checkpoint loading does: a tensor the rebuilt head lacks, one the file
lacks, or one of another shape is a one-line :class:`~protlm.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

import torch
from torch import nn

from protlm.errors import CheckpointError
from protlm.evaluate.heads import KINDS, ConvBertHead, HeadConfig, LightHead, LightHeadConfig

FORMAT_VERSION = 1
TENSORS_FILE = "head.safetensors"
META_FILE = "head.json"


@dataclass
class HeadMeta:
    """What ``head.json`` holds. Everything a prediction needs besides the tensors is here."""

    task: str  # task name ("SSP-3"); names the head's columns in predictions
    kind: str  # one of heads.KINDS
    classes: list[str] | None  # classification: label names in class-id order; None for regression
    in_dim: int  # width of the per-residue embeddings the head reads
    layer: int  # encoder layer the embeddings come from (resolved: 0 = embedding output, n = after the last block)
    prefix: str  # task token the encoder saw before the residues (nlu, s2s or none), resolved
    head_type: str  # key of HEAD_TYPES
    head_config: dict[str, Any] = field(default_factory=dict)  # keyword config of the head type's builder
    pooling: str = "none"  # per-protein kinds: "mean" (masked mean over residues, inside the head); "none"
    max_length: int | None = None  # per-protein kinds: longer proteins show the head their first and last halves
    target_shift: float = 0.0  # regression: the head predicts (value - shift) / scale
    target_scale: float = 1.0
    # backbone identity: model (checkpoint path or Hub id, or "one-hot"), config_hash (of the model config),
    # embed_dtype (compute precision of the embeddings), random_init / init_seed for a random-init twin,
    # model_type and family
    backbone: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # test set -> metric -> value
    valid: dict[str, float] = field(default_factory=dict)  # validation metrics of the kept epoch
    seed: int | None = None
    best_epoch: int | None = None
    source: str = ""  # report column the head was trained for ("pretrained", "one-hot", ...)
    trained_by: str = ""  # "protlm evaluate" | "protlm train-head"
    # fine-tuned backbone (None: frozen): {"mode": "lora", "path": "adapter", ...settings} with a PEFT adapter
    # directory, or {"mode": "full", "path": "backbone.safetensors", ...} with the trained backbone tensors, both
    # inside the bundle and applied to the base model named in ``backbone``
    finetune: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def n_out(self) -> int:
        return len(self.classes) if self.classes else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "HeadMeta":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown field(s) {', '.join(unknown)} (written by a newer protlm?)")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
        meta = cls(**data)
        if meta.format_version > FORMAT_VERSION:
            raise CheckpointError(f"{where}: format_version {meta.format_version} is newer than this protlm "
                                  f"reads ({FORMAT_VERSION}); upgrade protlm")
        if meta.kind not in KINDS:
            raise CheckpointError(f"{where}: unknown task kind {meta.kind!r} (known: {', '.join(KINDS)})")
        if meta.kind.endswith("classification") and not meta.classes:
            raise CheckpointError(f"{where}: a {meta.kind} head needs its class names ('classes')")
        return meta


@dataclass
class HeadBundle:
    """A loaded bundle: the head (eval mode, on CPU) and its metadata."""

    head: nn.Module
    meta: HeadMeta
    path: str  # the bundle directory

    @property
    def name(self) -> str:
        return self.meta.task


@dataclass(frozen=True)
class HeadType:
    """How to rebuild one kind of head: ``build(in_dim, kind, n_out, **config)`` and the module class it makes."""

    cls: type
    build: Callable[..., nn.Module]


HEAD_TYPES: dict[str, HeadType] = {}


def register_head_type(name: str, cls: type, build: Callable[..., nn.Module]) -> None:
    """Make heads of class ``cls`` storable under ``name``; ``build(in_dim, kind, n_out, **head_config)``."""
    HEAD_TYPES[name] = HeadType(cls, build)


def head_type_of(head: nn.Module) -> str:
    """The registered name of ``head``'s class (exact class match)."""
    for name, t in HEAD_TYPES.items():
        if type(head) is t.cls:
            return name
    raise CheckpointError(f"{type(head).__name__} is not a registered head type "
                          f"(known: {', '.join(HEAD_TYPES)}); register it with register_head_type")


def build_head(meta: HeadMeta, where: str = "head") -> nn.Module:
    """A fresh head of ``meta``'s type and shape (weights as initialised)."""
    t = HEAD_TYPES.get(meta.head_type)
    if t is None:
        raise CheckpointError(f"{where}: unknown head type {meta.head_type!r} (known: {', '.join(HEAD_TYPES)})")
    try:
        return t.build(meta.in_dim, meta.kind, meta.n_out, **meta.head_config)
    except TypeError as err:  # a config key the builder does not take
        raise CheckpointError(f"{where}: head_config does not fit head type {meta.head_type!r} ({err})") from None


register_head_type("convbert", ConvBertHead,
                   lambda in_dim, kind, n_out, **cfg: ConvBertHead(in_dim, kind, n_out, HeadConfig(**cfg)))
register_head_type("light", LightHead,
                   lambda in_dim, kind, n_out, **cfg: LightHead(in_dim, kind, n_out, LightHeadConfig(**cfg)))


def save_bundle(directory: str | os.PathLike, head: nn.Module, meta: HeadMeta,
                backbone: Callable[[str], None] | None = None) -> str:
    """Write ``head.safetensors`` and ``head.json`` into ``directory``, replacing a bundle already there.

    Both files are written into a temporary directory beside it that then takes the bundle's place, so a reader
    never sees the tensors of one head with the JSON of another. ``backbone(dir)``, for a fine-tuned head, writes
    the backbone's trained part into the same temporary directory first. Returns the directory.
    """
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    if meta.head_type not in HEAD_TYPES or type(head) is not HEAD_TYPES[meta.head_type].cls:
        meta.head_type = head_type_of(head)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in head.state_dict().items()}
        save_file(state, os.path.join(tmp, TENSORS_FILE), metadata={"format": "pt"})
        if backbone is not None:
            backbone(tmp)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as fh:
            json.dump(_plain(meta.to_dict()), fh, indent=1, allow_nan=False)
            fh.write("\n")
        _install(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def copy_bundle(source: str | os.PathLike, directory: str | os.PathLike) -> str:
    """Copy the bundle (or a folder of bundles) at ``source`` to ``directory``, replacing what is there."""
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        _install(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _install(tmp: str, directory: str) -> None:
    """Put the finished directory ``tmp`` at ``directory``: the old one is moved aside, never half-overwritten."""
    os.chmod(tmp, 0o777 & ~_umask())
    if os.path.isdir(directory):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(directory) + "-", dir=os.path.dirname(tmp))
        os.replace(directory, os.path.join(old, "bundle"))
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def config_hash(config) -> str:
    """SHA-1 of a model config (``T5Config``/``EsmConfig``): part of a backbone's identity."""
    import hashlib

    return hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def model_name(spec: str | os.PathLike) -> str:
    """How a backbone is named in a bundle: the absolute path of a checkpoint directory, else the Hub id/preset."""
    spec = os.fspath(spec)
    return os.path.abspath(spec) if os.path.isdir(spec) else spec


def read_meta(directory: str | os.PathLike) -> HeadMeta:
    """The ``head.json`` of a bundle (no tensors read)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such head bundle directory")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a head bundle holds {META_FILE} and {TENSORS_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return HeadMeta.from_dict(data, path)


def load_bundle(directory: str | os.PathLike) -> HeadBundle:
    """Rebuild the head of a bundle from its JSON and load its tensors, every one accounted for."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    meta = read_meta(directory)
    path = os.path.join(directory, TENSORS_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; a head bundle holds {META_FILE} and {TENSORS_FILE}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    head = build_head(meta, os.path.join(directory, META_FILE))
    expected = head.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f" for a {meta.head_type} head of width {meta.in_dim}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f" for a {meta.head_type} head of width {meta.in_dim}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k!r} is {tuple(tensors[k].shape)}, the head described in "
                                  f"{META_FILE} needs {tuple(v.shape)}")
    head.load_state_dict(tensors, strict=True)
    return HeadBundle(head.eval(), meta, directory)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it back at once
    os.umask(mask)
    return mask


def _plain(o: Any) -> Any:
    """JSON-ready: numpy scalars to Python numbers, NaN (a metric with nothing to score) to null."""
    import math

    import numpy as np

    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
