"""LoRA adapters on protlm models, through ``peft``, stored in peft's own on-disk format.

Adapters go into the projections of the encoder's blocks only (``model.encoder.block``): the LM head, the T5
decoder and the ESM contact head stay as they are, since fine-tuning feeds per-residue features to a task head.
``peft.inject_adapter_in_model`` swaps each targeted projection for a LoRA layer in place, so the model keeps its
protlm class (``model.encoder(...)`` still works) and its module names (the Hugging Face ones).

A target is a suffix of a projection's name inside one block ("q", "query", "attention.output.dense"). A target
that is the whole in-block name of some projection means that projection only: ESM's "output.dense" is the
feed-forward output, not also "attention.output.dense" (which "dense" would add, with "intermediate.dense").

An adapter directory is what ``PeftModel.save_pretrained`` writes for the Hugging Face class of the same weights
(``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight``), so ``PeftModel.from_pretrained(EsmForMaskedLM..., directory)``
reads ours, and :func:`load_adapter` reads one peft wrote. protlm's identity of the base (config hash, family)
goes in a file of its own, ``protlm_adapter.json``, which peft ignores.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from protlm.config import BERT_FAMILIES, ESM_FAMILIES, FAMILIES, GPT2_FAMILIES, read_json_object
from protlm.errors import ConfigError
from protlm.model.bert import BERT
from protlm.model.esm import ESM
from protlm.model.gpt2 import GPT2, Conv1D
from protlm.model.t5 import T5
from protlm.utils import atomic_path, atomic_write_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "protlm_adapter.json"
ADAPTER = "default"  # peft's adapter name inside the model; absent from the files, as peft writes them
KEY_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its files

def require_peft() -> None:
    """LoRA runs through ``peft``, an optional dependency: without it, a one-line hint instead of an ImportError."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("LoRA fine-tuning needs the peft library: pip install 'protlm[finetune]' (or "
                          "pip install peft); full fine-tuning (--finetune full) works without it") from None


# Keyed by architecture: protlm_family says which published weights a model holds, and "custom" is shared by all.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o"),
    "esm": ("query", "key", "value", "attention.output.dense"),
    "bert": ("query", "key", "value", "attention.output.dense"),
    "gpt2": ("c_attn", "attn.c_proj"),
}
FFN_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("wi", "wi_0", "wi_1", "wo"),  # wi in ReLU blocks (ProtT5), wi_0/wi_1 in gated ones (Ankh)
    "esm": ("intermediate.dense", "output.dense"),
    "bert": ("intermediate.dense", "output.dense"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
}
_ARCHITECTURES = ((T5, "t5", FAMILIES), (ESM, "esm", ESM_FAMILIES), (BERT, "bert", BERT_FAMILIES),
                  (GPT2, "gpt2", GPT2_FAMILIES))


def architecture(model: nn.Module) -> str:
    """The key of :data:`DEFAULT_TARGETS` for ``model``: "t5", "esm" (DPLM too), "bert" or "gpt2"."""
    for cls, name, _ in _ARCHITECTURES:
        if isinstance(model, cls):
            return name
    raise ConfigError(f"LoRA needs a protlm model (T5, ESM, BERT or GPT-2), not {type(model).__name__}")


# --- which projections --------------------------------------------------------------------------------------
def _projections(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Every projection of the encoder's blocks: full module name -> (in-block name, in features, out features).

    A projection already wrapped by LoRA counts once, with its base layer's shape."""
    from peft.tuners.lora import LoraLayer

    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, tuple[str, int, int]] = {}
    for block in model.encoder.block:
        prefix = names[id(block)]
        wrapped: list[str] = []
        for rel, mod in block.named_modules():
            if any(rel.startswith(w + ".") for w in wrapped):
                continue
            if isinstance(mod, LoraLayer):
                wrapped.append(rel)
                mod = mod.get_base_layer()
            if isinstance(mod, nn.Linear):
                out[f"{prefix}.{rel}"] = (rel, mod.in_features, mod.out_features)
            elif isinstance(mod, Conv1D):  # GPT-2's weight is (in, out)
                out[f"{prefix}.{rel}"] = (rel, *mod.weight.shape)
    return out


def projection_names(model: nn.Module) -> list[str]:
    """The shortest target naming each distinct in-block projection, in block order (T5: q, k, v, o, wi_0,
    wi_1, wo; ESM: query, key, value, attention.output.dense, intermediate.dense, output.dense)."""
    rels = list(dict.fromkeys(rel for rel, _, _ in _projections(model).values()))
    shown = []
    for rel in rels:
        parts = rel.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if [r for r in rels if _matches(r, suffix, rels)] == [rel]:
                break
        shown.append(suffix)
    return shown


def _matches(rel: str, target: str, rels: Iterable[str]) -> bool:
    """Whether ``target`` picks the in-block name ``rel``: the whole name, or a dotted suffix of it when no
    projection is named ``target`` whole."""
    if rel == target:
        return True
    return rel.endswith("." + target) and target not in rels


def _check_family(model: nn.Module, family: str | None) -> str:
    arch = architecture(model)
    families = next(fams for _, name, fams in _ARCHITECTURES if name == arch)
    if family is not None and family != arch and family not in families:
        raise ConfigError(f"family {family!r} does not fit this {type(model).__name__} model "
                          f"(use {arch!r} or one of {', '.join(families)})")
    return arch


def resolve_targets(model: nn.Module, targets: Sequence[str] | None = None, ffn: bool = False,
                    family: str | None = None) -> list[str]:
    """The LoRA targets for ``model``: ``targets`` as given (checked), or the attention projections of its
    architecture, plus the feed-forward ones with ``ffn``.

    ``family`` may be an architecture name or a ``protlm_family``; the model's class decides either way, and a
    family of another architecture is an error. A target that picks no projection of the encoder's blocks is a
    :class:`ConfigError` listing the model's projection names.
    """
    arch = _check_family(model, family)
    if isinstance(targets, str):  # "q,v" as a command line gives it
        targets = targets.split(",")
    rels = {rel for rel, _, _ in _projections(model).values()}
    if targets is None:
        wanted = DEFAULT_TARGETS[arch] + (FFN_TARGETS[arch] if ffn else ())
        # T5 has wi or wi_0/wi_1, not both: a default that this model lacks is dropped, not an error
        return [t for t in wanted if any(_matches(r, t, rels) for r in rels)]
    chosen = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    if ffn:
        chosen += [t for t in FFN_TARGETS[arch] if t not in chosen and any(_matches(r, t, rels) for r in rels)]
    if not chosen:
        raise ConfigError("LoRA targets: none given; this model's projections are "
                          f"{', '.join(projection_names(model))}")
    unknown = [t for t in chosen if not any(_matches(r, t, rels) for r in rels)]
    if unknown:
        raise ConfigError(f"LoRA target(s) {', '.join(unknown)} match no projection of the encoder; this model's "
                          f"projections are {', '.join(projection_names(model))}")
    return chosen


def _target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[str, int, int]]:
    projections = _projections(model)
    rels = {rel for rel, _, _ in projections.values()}
    return {name: p for name, p in projections.items() if any(_matches(p[0], t, rels) for t in targets)}


def _target_pattern(model: nn.Module, targets: Sequence[str]) -> str:
    """The regular expression peft matches (whole) against module names: the targeted in-block names in every
    block of the encoder (ESM: "esm.encoder.layer.<digits>." then one of the in-block names). A pattern
    rather than a list of names, since peft reads each listed name as a suffix ("output.dense" would also
    pick attention.output.dense)."""
    names = {id(m): n for n, m in model.named_modules()}
    stack = names[id(model.encoder.block)]
    rels = dict.fromkeys(rel for rel, _, _ in _target_modules(model, targets).values())
    return rf"{re.escape(stack)}\.\d+\.(?:{'|'.join(re.escape(r) for r in rels)})"


# --- injecting ----------------------------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _conv1d_lora_class():
    """peft's LoRA layer for protlm's GPT-2 ``Conv1D`` (peft knows only transformers' own): a weight stored
    (in, out), so the update is applied transposed (``fan_in_fan_out``), as peft does for transformers' GPT-2."""
    from peft.tuners.lora import Linear

    class Conv1DLora(Linear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            d_in, d_out = module.weight.shape
            return d_in, d_out

    return Conv1DLora


def _inject(model: nn.Module, config, source: str) -> None:
    from peft import inject_adapter_in_model

    if _lora_layers(model):
        raise ConfigError(f"{source}: the model already holds LoRA layers; add adapters to a freshly loaded model")
    if isinstance(model, GPT2):
        config.fan_in_fan_out = True
        config._register_custom_module({Conv1D: _conv1d_lora_class()})
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from None
    _freeze_base(model)


def _freeze_base(model: nn.Module) -> None:
    """Only the adapters train. Adapters of a bf16/fp16 base are kept in fp32, as ``peft.get_peft_model`` keeps
    them (its ``autocast_adapter_dtype``): peft runs the adapter branch in its weights' dtype and casts the sum
    back to the base's."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _lora_layers(model).values():
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
            p.requires_grad_(True)


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] | None = None) -> nn.Module:
    """Put LoRA adapters (``rank``, scale ``alpha / rank``, ``dropout`` on their input) into the projections
    ``targets`` picks (None: :func:`resolve_targets`' defaults) of the encoder's blocks, in place, and freeze
    everything else. Returns ``model``, still of its protlm class."""
    require_peft()
    import peft

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora_rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    targets = resolve_targets(model, targets)
    pattern = _target_pattern(model, targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=pattern,
                             bias="none")
    _inject(model, config, "LoRA")
    return model


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable LoRA parameters in ``model``."""
    return sum(p.numel() for layer in _lora_layers(model).values()
               for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()) if p.requires_grad)


def expected_lora_parameters(model: nn.Module, rank: int, targets: Sequence[str]) -> int:
    """What rank-``rank`` adapters on ``targets`` add: rank * (in + out) for every targeted projection."""
    return sum(rank * (d_in + d_out) for _, d_in, d_out in _target_modules(model, targets).values())


# --- adapter tensors ----------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, as copies: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    out = {}
    for name, layer in _lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().clone()
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA state") -> None:
    """Copy adapter tensors (as :func:`lora_state_dict` gives them) into the model's LoRA layers; every layer
    must get both of its tensors, in its shapes."""
    params = {}
    for name, layer in _lora_layers(model).items():
        params[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
        params[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    if not params:
        raise ConfigError(f"{source}: the model holds no LoRA layers (add_lora or load_adapter first)")
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        what = "; ".join(x for x in (unexpected and f"no such LoRA layer in the model: {_names(unexpected)}",
                                     missing and f"no tensor for {_names(missing)}") if x)
        raise ConfigError(f"{source}: does not fit the model's adapters ({what})")
    for key, p in params.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise ConfigError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model's adapter has "
                              f"{tuple(p.shape)}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- adapter directories ------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str | None = None,
                 base_config_hash: str | None = None) -> str:
    """Write the model's adapter as ``PeftModel.save_pretrained`` would for the same Hugging Face model, plus
    ``protlm_adapter.json`` (the base's config hash and family, the in-block targets). ``base_model`` is the Hub
    id or checkpoint path peft will name as ``base_model_name_or_path``. Each file is written atomically.
    Returns the directory."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    layers = _lora_layers(model)
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if not layers or config is None:
        raise ConfigError(f"{directory}: the model holds no LoRA adapter to save")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    state = {KEY_PREFIX + k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    data = config.to_dict()
    data.update(base_model_name_or_path=base_model, inference_mode=True, auto_mapping=None)
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(data, indent=2, sort_keys=True) + "\n")
    projections = _projections(model)
    meta = {"base_model": base_model, "base_config_hash": base_config_hash,
            "architecture": architecture(model), "protlm_family": model.config.protlm_family,
            "targets": list(dict.fromkeys(projections[n][0] if n in projections else n for n in layers))}
    atomic_write_text(os.path.join(directory, META_FILE), json.dumps(meta, indent=1) + "\n")
    return directory


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """protlm's record of an adapter's base (None for an adapter that peft wrote)."""
    path = os.path.join(os.fspath(directory), META_FILE)
    return read_json_object(path) if os.path.exists(path) else None


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, base_config_hash: str | None = None) -> nn.Module:
    """Put the adapter saved in ``directory`` (by :func:`save_adapter`, or by peft for the same Hugging Face
    model) into ``model``, in place, with the base frozen and the adapter trainable. Returns ``model``.

    With ``base_config_hash``, an adapter whose recorded base has another config hash is refused. Missing or
    corrupt files, target modules that the model lacks, and tensors of other shapes are :class:`ConfigError`\\ s
    naming the directory and what differs.
    """
    require_peft()
    import peft

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: no such adapter directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ConfigError(f"{directory}: no {name}; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = read_adapter_meta(directory)
    stored = meta.get("base_config_hash") if meta else None
    if base_config_hash is not None and stored is not None and stored != base_config_hash:
        raise ConfigError(f"{directory}: the adapter was trained on another base model (config hash "
                          f"{str(stored)[:12]}, this model's is {base_config_hash[:12]}; base "
                          f"{meta.get('base_model')})")
    data = read_json_object(os.path.join(directory, CONFIG_FILE))
    if data.get("peft_type") != "LORA":
        raise ConfigError(f"{directory}: {CONFIG_FILE} is a {data.get('peft_type')!r} adapter; protlm loads LoRA ones")
    data.pop("runtime_config", None)
    try:
        config = peft.LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{directory}: {CONFIG_FILE} is not a valid LoRA config ({err})") from None
    if config.modules_to_save or config.use_dora or config.lora_bias:
        raise ConfigError(f"{directory}: the adapter uses modules_to_save, DoRA or LoRA biases, which protlm does "
                          "not load; plain LoRA adapters only")
    state = _read_adapter_tensors(directory)
    _inject(model, config, directory)
    try:
        layers = _lora_layers(model)
        renamed = {}
        for key, tensor in state.items():
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key.removeprefix(KEY_PREFIX))
            if m is None:
                raise ConfigError(f"{directory}: {WEIGHTS_FILE} holds {key}, not a LoRA A/B weight")
            renamed[f"{_our_module(m[1], layers)}.{m[2]}.weight"] = tensor
        load_lora_state_dict(model, renamed, os.path.join(directory, WEIGHTS_FILE))
    except BaseException:
        _remove_lora(model, merge=False)  # leave the model as it came
        raise
    return model


def _our_module(name: str, layers: dict[str, Any]) -> str:
    """The model's name for a module an adapter file names: the same, or (peft on a headless Hugging Face model,
    EsmModel's "encoder.layer.0...") the one LoRA layer whose name ends with it."""
    if name in layers:
        return name
    found = [n for n in layers if n.endswith("." + name)]
    return found[0] if len(found) == 1 else name


def _read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_FILE)
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError, OSError: a truncated or corrupt file
        raise ConfigError(f"{path}: cannot read the adapter tensors ({str(err).splitlines()[0]})") from None


# --- merging ------------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base layer back in its place, in place: the result is
    a plain protlm model whose state dict has the original names (``protlm.convert.save_pretrained`` writes it as
    a normal checkpoint). Parameters keep their requires_grad flags (the base stays frozen)."""
    if not _lora_layers(model):
        raise ConfigError("merge_lora: the model holds no LoRA layers")
    _remove_lora(model, merge=True)
    return model


def _remove_lora(model: nn.Module, merge: bool) -> None:
    """Put every LoRA layer's base layer back in its place, with the adapter folded in or dropped."""
    with torch.no_grad():
        for name, layer in _lora_layers(model).items():
            if merge:
                layer.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def export_merged(pretrained, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Load ``adapter_dir`` onto the base, merge it and write a checkpoint with protlm's own writer
    (``config.json``, ``model.safetensors``, tokenizer files) that ``protlm.load`` and transformers read.

    ``pretrained`` is a :class:`protlm.convert.Pretrained` (its model is merged in place) or anything
    ``protlm.convert.load`` takes. The adapter's recorded base config hash must be this base's."""
    from protlm.convert import Pretrained, load, save_pretrained
    from protlm.evaluate.bundle import config_hash

    pre = pretrained if isinstance(pretrained, Pretrained) else load(pretrained)
    load_adapter(pre.model, adapter_dir, base_config_hash=config_hash(pre.config))
    merge_lora(pre.model)
    return save_pretrained(pre.model, out_dir, pre.tokenizer)
