"""Reading and writing checkpoints in the Hugging Face layout, for every family.

A checkpoint directory holds ``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin``, or a
sharded ``*.index.json``) and the vocabulary (``tokenizer.json``, ``spiece.model`` or ``vocab.txt``). The family
comes from ``config.json``'s ``model_type`` (T5 or ESM). Our module names are the Hugging Face names, so the key
map is the identity plus the declared aliases below; every tensor in a file must be either a model parameter, a
declared alias or a declared buffer copy, and every parameter must be in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from protlm.config import (PRESET_NAMES, BertConfig, EsmConfig, GPT2Config, T5Config, config_from_hf_dict, preset,
                           read_json_object)
from protlm.convert import fallback
from protlm.errors import CheckpointError, ConfigError
from protlm.model.bert import BERT
from protlm.model.esm import ESM
from protlm.model.gpt2 import GPT2
from protlm.model.t5 import T5
from protlm.precision import Precision, choose
from protlm.tokenizer.bpe import BPETokenizer, load_bpe_tokenizer, residue_bpe_tokenizer
from protlm.tokenizer.vocab import Tokenizer, esm_tokenizer, load_tokenizer, prot_bert_tokenizer, protlm_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "*.safetensors", "*.index.json", "pytorch_model*.bin", "tokenizer.json",
                "spiece.model", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "merges.txt"]

Model = T5 | ESM | GPT2 | BERT
ModelConfig = T5Config | EsmConfig | GPT2Config | BertConfig


@dataclass
class Pretrained:
    """What :func:`load` returns for every family: the network, the vocabulary it was trained with, and its
    config."""

    model: Model
    tokenizer: Tokenizer | BPETokenizer
    config: ModelConfig
    source: str  # the checkpoint directory or Hub id, or "random-init <preset|directory|Hub id> seed=<n>"
    precision: Precision | None = None  # the compute precision a dtype option resolved to, if one was given

    @property
    def family(self) -> str:
        return self.config.protlm_family


# --- key map -------------------------------------------------------------------------------------------------
# inv_freq once per model, once per layer (older files), or under transformers 5's own wildcard key ("layer.*.")
_ESM_INV_FREQ = re.compile(r"(esm\.)?(encoder\.layer\.(\d+|\*)\.attention\.self\.)?rotary_embeddings\.inv_freq")
_ESM_IGNORED = re.compile(r"(esm\.)?embeddings\.position_ids")  # an index buffer some files carry
# published rotary ESM-2 files still carry an absolute position table that no code reads (transformers#39063)
_ESM_UNUSED_ROTARY = re.compile(r"(esm\.)?embeddings\.position_embeddings\.weight")
# BERT's old LayerNorm names, which transformers 5 writes back into the files it saves for ESM
_ESM_LEGACY_NORM = re.compile(r"\.LayerNorm\.(gamma|beta)$")
# GPT-2's causal-mask buffers, which files written by older transformers (ProtGPT2's among them) carry per layer
_GPT2_MASK_BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")
# BERT files may carry the index buffers (older transformers saved them) and, from BertForPreTraining, the
# next-sentence head, which ProtBERT never trained (each protein is one document) and no workflow reads
_BERT_IGNORED = re.compile(r"(bert\.)?embeddings\.(position_ids|token_type_ids)|cls\.seq_relationship\..*")


def key_aliases(model: Model) -> dict[str, str]:
    """File keys that are copies of a parameter stored under another name (tied embeddings)."""
    if isinstance(model, ESM):
        tied = model.lm_head is not None and model.config.tie_word_embeddings
        return {"lm_head.decoder.weight": "esm.embeddings.word_embeddings.weight"} if tied else {}
    if isinstance(model, GPT2):
        tied = model.lm_head is not None and model.config.tie_word_embeddings
        return {"lm_head.weight": "transformer.wte.weight"} if tied else {}
    if isinstance(model, BERT):  # the decoder's bias is cls.predictions.bias (transformers 4.x stores both)
        if model.cls is None:
            return {}
        aliases = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
        if model.config.tie_word_embeddings:
            aliases["cls.predictions.decoder.weight"] = "bert.embeddings.word_embeddings.weight"
        return aliases
    aliases = {"encoder.embed_tokens.weight": "shared.weight"}
    if model.decoder is not None:
        aliases["decoder.embed_tokens.weight"] = "shared.weight"
        if model.config.tie_word_embeddings:
            aliases["lm_head.weight"] = "shared.weight"
    return aliases


def canonical_state(model: Model) -> dict[str, torch.Tensor]:
    """Parameters under their Hugging Face names, each stored once."""
    aliases = key_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


# --- reading -------------------------------------------------------------------------------------------------
def _read_weight_file(path: str, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            out = {}
            with safe_open(path, framework="pt") as fh:
                for k in fh.keys():
                    if keys is None or k in keys:
                        out[k] = fh.get_tensor(k)
            return out
        except Exception as err:  # SafetensorError, OSError: truncated or corrupt file
            raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, whichever of the Hugging Face file layouts it uses."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".index.json"):
            try:
                with open(path, encoding="utf-8") as fh:
                    index = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{path}: not a valid shard index ({err})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.exists(shard_path):
                    raise CheckpointError(f"{path}: shard {shard} is listed but missing")
                state.update(_read_weight_file(shard_path))
            return state
        return _read_weight_file(path)
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def infer_family(config: T5Config, tokenizer: Tokenizer | None) -> str:
    if config.protlm_family != "custom":
        return config.protlm_family
    if tokenizer is not None and "nlu" in tokenizer.prefix_ids:
        return "ankh3"
    if config.feed_forward_proj == "relu" and config.vocab_size == 128:
        return "prot-t5"
    if config.vocab_size == 144:
        return "ankh"
    return "custom"


def resolve_path(path_or_id: str, revision: str | None = None, config_only: bool = False) -> str:
    """A local directory as is; otherwise a Hugging Face Hub id, fetched through ``huggingface_hub`` (only its
    ``config.json`` with ``config_only``)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: is a file; a checkpoint is a directory holding config.json and weights")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise CheckpointError(f"{path}: no such checkpoint directory (and not a Hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{path}: not a local directory, and huggingface_hub is not installed") from None
    try:
        return snapshot_download(path, revision=revision,
                                 allow_patterns=["config.json"] if config_only else HUB_PATTERNS)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot fetch from the Hugging Face Hub ({type(err).__name__}: {err})") from None


def load(
    spec: "str | os.PathLike | ModelConfig",
    *,
    random_init: bool = False,
    encoder_only: bool | None = None,
    dtype: "torch.dtype | str | Precision | None" = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    revision: str | None = None,
) -> Pretrained:
    """Resolve any model argument, the same way for every command and library caller.

    - a checkpoint directory or Hub id: its weights;
    - with ``random_init``: random weights (seed ``seed``) and protlm's vocabulary, in the shape of a preset name,
      a :class:`T5Config`, or a checkpoint directory / Hub id (its random-init twin: only its config is read).

    ``encoder_only`` None follows the checkpoint (a ``T5EncoderModel`` gives an encoder); True keeps only the
    encoder. ``dtype`` is a torch dtype, or a precision name or ``auto`` resolved for ``device`` by
    :func:`protlm.precision.choose` (the choice is kept in ``Pretrained.precision``); None keeps the stored
    dtype. Every tensor of a checkpoint is accounted for: missing, unexpected and mis-shaped tensors are errors
    that name them.
    """
    if random_init:
        pre = _random(spec, seed, encoder_only, revision)
    elif isinstance(spec, (T5Config, EsmConfig, GPT2Config, BertConfig)):
        raise ConfigError(f"a {type(spec).__name__} has no weights; pass random_init=True for random ones")
    else:
        if os.fspath(spec) in PRESET_NAMES and not os.path.exists(spec):
            raise ConfigError(f"{spec!r} is a preset, not a checkpoint; add --random-init (random_init=True) "
                              "for randomly initialised weights")
        pre = _from_checkpoint(resolve_path(spec, revision), encoder_only)
        if not os.path.isdir(spec):  # a Hub id: name the model by its id, not by the download cache
            pre.source = os.fspath(spec)
    if isinstance(dtype, str):
        dtype = choose(dtype, torch.device(device), "inference", option="--dtype")
    if isinstance(dtype, Precision):
        pre.precision, dtype = dtype, dtype.dtype
    pre.model.to(device=device, dtype=dtype)
    return pre


def _from_checkpoint(directory: str, encoder_only: bool | None) -> Pretrained:
    path = os.path.join(directory, "config.json")
    data = read_json_object(path)
    if fallback.fallback_wanted(data, path):  # another Hub encoder: transformers' AutoModel, marked in the log
        return fallback.load_hf_encoder(directory, data, path)
    config = config_from_hf_dict(data, path)
    if isinstance(config, EsmConfig):
        return _esm_from_checkpoint(directory, config, encoder_only)
    if isinstance(config, GPT2Config):
        return _gpt2_from_checkpoint(directory, config, encoder_only)
    if isinstance(config, BertConfig):
        return _bert_from_checkpoint(directory, config, encoder_only)
    tokenizer = load_tokenizer(directory, config.protlm_family)
    family = infer_family(config, tokenizer)
    if family != config.protlm_family:
        config = config.replace(protlm_family=family)
        if family == "prot-t5":  # re-read with ProtT5's conventions (space-separated, rare residues -> X)
            tokenizer = load_tokenizer(directory, family)
    if tokenizer is None:
        if config.vocab_size == 256 and family in ("ankh3", "custom"):
            tokenizer = protlm_tokenizer()
        else:
            raise CheckpointError(
                f"{directory}: no tokenizer.json or spiece.model; protlm will not guess the ids of a "
                f"{config.vocab_size}-token vocabulary"
            )
    state = read_weights(directory)
    config = _untie_if_stored_apart(config, state)
    file_has_decoder = any(k.startswith("decoder.") for k in state)
    if encoder_only is None:
        encoder_only = not file_has_decoder or config.n_decoder_layers == 0
    if encoder_only and file_has_decoder:
        state = {k: v for k, v in state.items() if not (k.startswith("decoder.") or k == "lm_head.weight")}
    model = build_model(config, encoder_only=encoder_only, state=state, source=directory).eval()
    return Pretrained(model, tokenizer, config, directory)


def _untie_if_stored_apart(config: T5Config, state: dict[str, torch.Tensor]) -> T5Config:
    """transformers 5 writes tie_word_embeddings=true for every T5, and does not tie a head whose file stores it
    with values of its own (an Ankh-style head saved by transformers 5). Read such a file as it does: untied."""
    head, embedding = state.get("lm_head.weight"), state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if (config.tie_word_embeddings and config.scale_decoder_outputs is False and head is not None
            and embedding is not None and not torch.equal(head, embedding)):
        return config.replace(tie_word_embeddings=False, scale_decoder_outputs=None)
    return config


def _esm_from_checkpoint(directory: str, config: EsmConfig, encoder_only: bool | None) -> Pretrained:
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise CheckpointError(f"{directory}: no vocab.txt (or tokenizer.json); protlm will not guess the ids of a "
                              f"{config.vocab_size}-token ESM vocabulary")
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{directory}: the vocabulary has {tokenizer.vocab_size} tokens but config.json "
                              f"says vocab_size {config.vocab_size}")
    state = read_weights(directory)
    if not any(k.startswith(("esm.", "lm_head.")) for k in state):  # EsmModel layout: no "esm." prefix
        state = {f"esm.{k}": v for k, v in state.items()}
    state = {_ESM_LEGACY_NORM.sub(lambda m: ".LayerNorm." + ("weight" if m[1] == "gamma" else "bias"), k): v
             for k, v in state.items()}
    has_head = any(k.startswith("lm_head.") for k in state)
    encoder_only = (not has_head) if encoder_only is None else encoder_only
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    elif not has_head:
        raise CheckpointError(f"{directory}: no LM head (lm_head.*) in the weights; this is an EsmModel checkpoint, "
                              "usable for embeddings only")
    model = build_model(config, encoder_only=encoder_only, state=state, source=directory,
                        contact_head="esm.contact_head.regression.weight" in state,
                        pooler="esm.pooler.dense.weight" in state).eval()
    return Pretrained(model, tokenizer, config, directory)


def _gpt2_from_checkpoint(directory: str, config: GPT2Config, encoder_only: bool | None) -> Pretrained:
    tokenizer = load_bpe_tokenizer(directory)
    if tokenizer is None:
        raise CheckpointError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt); protlm will not guess "
                              f"the ids of a {config.vocab_size}-token BPE vocabulary")
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: the vocabulary has {tokenizer.vocab_size} tokens but config.json says "
                              f"vocab_size {config.vocab_size}")
    state = read_weights(directory)
    if not any(k.startswith(("transformer.", "lm_head.")) for k in state):  # GPT2Model layout: no prefix
        state = {f"transformer.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _GPT2_MASK_BUFFERS.fullmatch(k)}
    architectures = read_json_object(os.path.join(directory, "config.json")).get("architectures") or []
    if encoder_only is None:  # a tied head is in no file: the architecture says whether there is one
        encoder_only = "GPT2Model" in architectures and "lm_head.weight" not in state
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    model = build_model(config, encoder_only=encoder_only, state=state, source=directory).eval()
    return Pretrained(model, tokenizer, config, directory)


def _bert_from_checkpoint(directory: str, config: BertConfig, encoder_only: bool | None) -> Pretrained:
    tokenizer = load_tokenizer(directory, config.protlm_family)
    if tokenizer is None:
        raise CheckpointError(f"{directory}: no vocab.txt (or tokenizer.json); protlm will not guess the ids of a "
                              f"{config.vocab_size}-token BERT vocabulary")
    if tokenizer.bos_id is None or tokenizer.mask_id is None:
        raise CheckpointError(f"{directory}: the vocabulary ({tokenizer.source}) has no [CLS] or [MASK] token, "
                              "which every BERT input and masked position uses")
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{directory}: the vocabulary has {tokenizer.vocab_size} tokens but config.json "
                              f"says vocab_size {config.vocab_size}")
    state = read_weights(directory)
    if not any(k.startswith(("bert.", "cls.")) for k in state):  # BertModel layout: no "bert." prefix
        state = {f"bert.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _BERT_IGNORED.fullmatch(k)}
    has_head = any(k.startswith("cls.predictions.") for k in state)
    encoder_only = (not has_head) if encoder_only is None else encoder_only
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
    elif not has_head:
        raise CheckpointError(f"{directory}: no MLM head (cls.predictions.*) in the weights; this is a BertModel "
                              "checkpoint, usable for embeddings only")
    model = build_model(config, encoder_only=encoder_only, state=state, source=directory,
                        pooler="bert.pooler.dense.weight" in state).eval()
    return Pretrained(model, tokenizer, config, directory)


def read_config(spec: "str | os.PathLike", revision: str | None = None) -> tuple[ModelConfig, bool]:
    """(config, stored encoder-only) of a preset name, a checkpoint directory or a Hub id, without weights."""
    if os.fspath(spec) in PRESET_NAMES and not os.path.exists(spec):
        return preset(os.fspath(spec)), False
    path = os.path.join(resolve_path(spec, revision, config_only=True), "config.json")
    data = read_json_object(path)
    if fallback.fallback_wanted(data, path):
        return fallback.HFEncoderConfig.from_hf_dict(data, path), True
    architectures = data.get("architectures") or []
    return config_from_hf_dict(data, path), bool({"T5EncoderModel", "EsmModel", "GPT2Model", "BertModel"} & set(architectures))


def _random(spec, seed: int, encoder_only: bool | None, revision: str | None) -> Pretrained:
    """Random weights in the shape of a preset, a config, or a checkpoint (its twin)."""
    if isinstance(spec, (T5Config, EsmConfig, GPT2Config, BertConfig)):
        config, name, stored_encoder_only = spec, "config", False
    else:
        config, stored_encoder_only = read_config(spec, revision)
        name = os.path.abspath(spec) if os.path.isdir(spec) else os.fspath(spec)
        if isinstance(config, fallback.HFEncoderConfig):
            raise fallback.random_init_refusal(name)
    encoder_only = stored_encoder_only if encoder_only is None else encoder_only
    if isinstance(config, EsmConfig):
        tokenizer = esm_tokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"{name}: vocab_size {config.vocab_size} is smaller than ESM's {tokenizer.vocab_size}-token "
                              "alphabet, which a random-init ESM model uses")
        model = build_model(config, encoder_only=encoder_only, seed=seed).eval()
        return Pretrained(model, tokenizer, config, f"random-init {name} seed={seed}")
    if isinstance(config, BertConfig):
        tokenizer = prot_bert_tokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"{name}: vocab_size {config.vocab_size} is smaller than ProtBERT's "
                              f"{tokenizer.vocab_size}-token vocabulary, which a random-init BERT model uses")
        model = build_model(config, encoder_only=encoder_only, seed=seed).eval()
        return Pretrained(model, tokenizer, config, f"random-init {name} seed={seed}")
    if isinstance(config, GPT2Config):  # a residue-level BPE (no merges) inside the model's vocabulary
        tokenizer = residue_bpe_tokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"{name}: vocab_size {config.vocab_size} is smaller than the {tokenizer.vocab_size} "
                              "tokens a random-init GPT-2 uses (<|endoftext|>, line break, residues)")
        model = build_model(config, encoder_only=encoder_only, seed=seed).eval()
        return Pretrained(model, tokenizer, config, f"random-init {name} seed={seed}")
    if config.vocab_size < 256:
        # A random model has no vocabulary of its own; it gets protlm's 256-id one (published shapes with
        # 128 or 144 ids are widened, which changes only the embedding and LM-head rows).
        config = config.replace(vocab_size=256)
    model = build_model(config, encoder_only=encoder_only, seed=seed).eval()
    return Pretrained(model, protlm_tokenizer(), config, f"random-init {name} seed={seed}")


def build_model(config: ModelConfig, *, encoder_only: bool = False, state: dict[str, torch.Tensor] | None = None,
                source: str = "weights", device: str | torch.device = "cpu", seed: int | None = None,
                **parts: bool) -> Model:
    """The one way protlm makes a model of any family: the structure on the meta device, then real tensors.

    ``parts`` are a family's optional modules (ESM: ``contact_head``, ``pooler``), present in a checkpoint or not.

    With ``state`` every parameter is assigned from it (each tensor accounted for); without, the model is
    materialised on ``device`` with T5's random init (see :func:`materialize`). Loading, training and truncation
    all come through here, so tying and the leftover-meta check live in one place.
    """
    with torch.device("meta"):
        family = (ESM if isinstance(config, EsmConfig) else GPT2 if isinstance(config, GPT2Config)
                  else BERT if isinstance(config, BertConfig) else T5)
        model = family(config, encoder_only=encoder_only, **parts)
    if state is None:
        materialize(model, device, seed)
    else:
        _assign(model, state, source)
    return model


def materialize(model: Model, device: str | torch.device, seed: int | None = None) -> None:
    """Give a meta-built model real storage on ``device`` and T5's random init (seeded when ``seed`` is given).

    The trainer calls this after sharding, so each process allocates only its shard; the numbers are drawn on
    the CPU whatever ``device`` and the sharding (see :class:`UnshardedDraws`).
    """
    model.to_empty(device=device)
    _retie(model)
    _init_buffers(model)
    if seed is not None:
        torch.manual_seed(seed)
    # Replay the draws that eager construction makes (each nn.Linear / nn.Embedding initialises itself), so a
    # seed gives the same weights as ``T5(config)`` on the CPU: random-init baselines and their cached results
    # stay what earlier versions computed.
    with UnshardedDraws(model):
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.reset_parameters()
        model.reset_parameters()
    _check_materialized(model, "random init")


class UnshardedDraws(torch.overrides.TorchFunctionMode):
    """Inside this context, an in-place init of a parameter of ``model`` (``normal_``, ``fill_``,
    ``nn.init.kaiming_uniform_``...) runs on a whole CPU tensor of the parameter's full shape, and the parameter
    (a plain tensor on any device, or an FSDP2 shard) takes its part of the result.

    So the values are those of an unsharded model initialised on the CPU, on every device and for every
    sharding, and the random stream advances exactly as it would there. DTensor's own random ops cannot give
    this: on CPUs every shard would draw the same numbers, and on GPUs the numbers come from another generator.
    The price is that every process draws every number (as eager construction did), one parameter at a time.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        # a plain CPU parameter is its own whole tensor: it draws in place
        self._params = {id(p) for p in model.parameters() if _is_dtensor(p) or p.device.type != "cpu"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if id(target) not in self._params or not getattr(func, "__name__", "").endswith("_"):
            return func(*args, **kwargs)
        full = torch.empty(target.shape, dtype=target.dtype, device="cpu")
        if args:
            func(full, *args[1:], **kwargs)
        else:
            func(**{**kwargs, "tensor": full})
        with torch.no_grad():
            _write_part(target, full)
        return target


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():  # some builds have no torch.distributed
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _write_part(param: torch.Tensor, full: torch.Tensor) -> None:
    if _is_dtensor(param):  # src_data_rank=None: every process cuts its own part, no communication
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


def _retie(model: Model) -> None:
    # assign=True and to_empty() give each module a new parameter object; the tied LM head must share again
    if model.lm_head is None or not model.config.tie_word_embeddings:
        return
    if isinstance(model, ESM):
        model.lm_head.decoder.weight = model.esm.embeddings.word_embeddings.weight
    elif isinstance(model, GPT2):
        model.lm_head.weight = model.transformer.wte.weight
    elif isinstance(model, BERT):
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    else:
        model.lm_head.weight = model.shared.weight


def _init_buffers(model: Model) -> None:
    init = getattr(model, "init_buffers", None)
    if init is not None:
        init()


def _check_materialized(model: Model, source: str) -> None:
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a parameter not covered by the map: a bug in protlm, not in the file
        raise CheckpointError(f"{source}: parameters left uninitialised: {_names(leftover)}")


def _assign(model: Model, state: dict[str, torch.Tensor], source: str) -> None:
    inv_freq = None
    if isinstance(model, ESM):
        state, inv_freq = _esm_buffers(model, state, source)
    expected = canonical_state(model)
    aliases = key_aliases(model)
    unexpected = [k for k in state if k not in expected and k not in aliases]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_names(unexpected)} for this config")
    # an alias can stand in for its target (some files store only encoder.embed_tokens.weight)
    state = dict(state)
    for alias, target in aliases.items():
        if target not in state and alias in state:
            state[target] = state[alias]
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_names(missing)}")
    embedding = ("esm.embeddings.word_embeddings.weight" if isinstance(model, ESM)
                 else "transformer.wte.weight" if isinstance(model, GPT2)
                 else "bert.embeddings.word_embeddings.weight" if isinstance(model, BERT) else "shared.weight")
    vocab_rows = state[embedding].shape[0]
    if vocab_rows != model.config.vocab_size:
        raise CheckpointError(
            f"{source}: {embedding} has {vocab_rows} rows but config vocab_size is {model.config.vocab_size}"
        )
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, config implies {tuple(ref.shape)}")
    for alias, target in aliases.items():
        if alias in state and tuple(state[alias].shape) != tuple(expected[target].shape):
            raise CheckpointError(f"{source}: tensor {alias} has shape {tuple(state[alias].shape)}, expected {tuple(expected[target].shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    _retie(model)
    if isinstance(model, ESM) and model.esm.rotary_embeddings is not None:
        rot = model.esm.rotary_embeddings
        # a copy: a view would keep the whole memory-mapped weight file resident
        rot.inv_freq = inv_freq.to(torch.float32, copy=True) if inv_freq is not None else rot.default_inv_freq()
    _check_materialized(model, source)


def _esm_buffers(model: ESM, state: dict[str, torch.Tensor], source: str):
    """(state without buffers, the stored rotary inv_freq or None). Files hold inv_freq once per layer (older
    layout) or once per model (newer); the stored values are kept as stored, since they may have been rounded when
    saved and the published outputs were computed with them. The position-id index buffer is dropped."""
    stored = sorted(k for k in state if _ESM_INV_FREQ.fullmatch(k))
    expected = (model.config.hidden_size // model.config.num_attention_heads) // 2
    if stored and model.esm.rotary_embeddings is None:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_names(stored)}: rotary tables, but the config says "
                              f"position_embedding_type={model.config.position_embedding_type!r}")
    if stored and tuple(state[stored[0]].shape) != (expected,):
        raise CheckpointError(f"{source}: tensor {stored[0]} has shape {tuple(state[stored[0]].shape)}, config "
                              f"implies ({expected},)")
    rotary = model.esm.rotary_embeddings is not None
    kept = {k: v for k, v in state.items() if not (_ESM_INV_FREQ.fullmatch(k) or _ESM_IGNORED.fullmatch(k)
                                                   or (rotary and _ESM_UNUSED_ROTARY.fullmatch(k)))}
    return kept, (state[stored[0]] if stored else None)


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- writing -------------------------------------------------------------------------------------------------
def save_pretrained(model: Model, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> str:
    """Write ``config.json``, ``model.safetensors`` and the vocabulary in the Hugging Face layout.

    ``transformers.T5ForConditionalGeneration`` (or ``T5EncoderModel`` for an encoder-only model), or
    ``EsmForMaskedLM`` (``EsmModel`` without the LM head), or ``GPT2LMHeadModel`` (``GPT2Model``), loads the
    result with no missing or unexpected keys.
    Each file is written atomically.
    """
    from safetensors.torch import save_file

    from protlm.utils import atomic_path

    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in canonical_state(model).items()}
    if isinstance(model, ESM):
        rot = model.esm.rotary_embeddings
        if rot is not None:  # the per-layer layout, which transformers 4.x reads as is and 5.x maps to its own
            for i in range(model.esm.n_layers):
                state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = rot.inv_freq.detach().cpu().clone()
        if model.lm_head is None:  # EsmModel: its keys carry no "esm." prefix
            state = {k.removeprefix("esm."): v for k, v in state.items()}
    elif isinstance(model, GPT2):
        if model.lm_head is None:  # GPT2Model: its keys carry no "transformer." prefix
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
    elif isinstance(model, BERT):
        if model.cls is None:  # BertModel: its keys carry no "bert." prefix
            state = {k.removeprefix("bert."): v for k, v in state.items()}
    elif model.lm_head is not None and model.config.tie_word_embeddings and not model.config.rescale_head:
        state["lm_head.weight"] = state["shared.weight"].clone()  # written as untied: see T5Config.to_hf_dict
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    model.config.save_json(os.path.join(directory, "config.json"), encoder_only=model.encoder_only)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def random_init(name_or_config: str | ModelConfig, seed: int = 0, encoder_only: bool = False) -> Pretrained:
    """Random weights with protlm's vocabulary: ``load(name_or_config, random_init=True, ...)``."""
    return load(name_or_config, random_init=True, seed=seed, encoder_only=encoder_only)
