"""Reading and writing checkpoints in the Hugging Face layout.

A checkpoint directory holds ``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin``, or a
sharded ``*.index.json``) and the vocabulary (``tokenizer.json`` or ``spiece.model``). Our module names are the
Hugging Face names, so the key map is the identity plus the declared aliases below; every tensor in a file must
be either a model parameter or a declared alias, and every parameter must be in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from protlm.config import T5Config
from protlm.errors import CheckpointError
from protlm.model.t5 import T5
from protlm.tokenizer.vocab import Tokenizer, load_tokenizer, protlm_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "*.safetensors", "*.index.json", "pytorch_model*.bin", "tokenizer.json",
                "spiece.model", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class Pretrained:
    """What :func:`load` returns: the network, the vocabulary it was trained with, and its config."""

    model: T5
    tokenizer: Tokenizer
    config: T5Config
    source: str

    @property
    def family(self) -> str:
        return self.config.protlm_family


# --- key map -------------------------------------------------------------------------------------------------
def key_aliases(model: T5) -> dict[str, str]:
    """File keys that are copies of a parameter stored under another name (tied embeddings)."""
    aliases = {"encoder.embed_tokens.weight": "shared.weight"}
    if model.decoder is not None:
        aliases["decoder.embed_tokens.weight"] = "shared.weight"
        if model.config.tie_word_embeddings:
            aliases["lm_head.weight"] = "shared.weight"
    return aliases


def canonical_state(model: T5) -> dict[str, torch.Tensor]:
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


def resolve_path(path_or_id: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a Hugging Face Hub id, fetched through ``huggingface_hub``."""
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
        return snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot fetch from the Hugging Face Hub ({type(err).__name__}: {err})") from None


def load(
    path_or_id: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    encoder_only: bool | None = None,
    revision: str | None = None,
) -> Pretrained:
    """Load a checkpoint directory or Hub id.

    ``encoder_only`` None follows the checkpoint (a ``T5EncoderModel`` gives an encoder); True loads only the
    encoder of a full checkpoint. Every tensor is accounted for: missing, unexpected and mis-shaped tensors are
    errors that name them.
    """
    directory = resolve_path(path_or_id, revision)
    config = T5Config.from_json(os.path.join(directory, "config.json"))
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
    file_has_decoder = any(k.startswith("decoder.") for k in state)
    if encoder_only is None:
        encoder_only = not file_has_decoder or config.n_decoder_layers == 0
    with torch.device("meta"):
        model = T5(config, encoder_only=encoder_only)
    _assign(model, state, directory, drop_decoder=encoder_only and file_has_decoder)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return Pretrained(model, tokenizer, config, directory)


def _assign(model: T5, state: dict[str, torch.Tensor], source: str, drop_decoder: bool) -> None:
    expected = canonical_state(model)
    aliases = key_aliases(model)
    if drop_decoder:
        state = {k: v for k, v in state.items() if not (k.startswith("decoder.") or k == "lm_head.weight")}
    unexpected = [k for k in state if k not in expected and k not in aliases]
    if model.config.tie_word_embeddings and "lm_head.weight" in unexpected and drop_decoder:
        unexpected.remove("lm_head.weight")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_names(unexpected)} for this config")
    # an alias can stand in for its target (some files store only encoder.embed_tokens.weight)
    for alias, target in aliases.items():
        if target not in state and alias in state:
            state[target] = state[alias]
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_names(missing)}")
    vocab_rows = state["shared.weight"].shape[0]
    if vocab_rows != model.config.vocab_size:
        raise CheckpointError(
            f"{source}: shared.weight has {vocab_rows} rows but config vocab_size is {model.config.vocab_size}"
        )
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, config implies {tuple(ref.shape)}")
    for alias, target in aliases.items():
        if alias in state and tuple(state[alias].shape) != tuple(expected[target].shape):
            raise CheckpointError(f"{source}: tensor {alias} has shape {tuple(state[alias].shape)}, expected {tuple(expected[target].shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if model.lm_head is not None and model.config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a parameter not covered by the map: a bug in protlm, not in the file
        raise CheckpointError(f"{source}: parameters left uninitialised: {_names(leftover)}")


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- writing -------------------------------------------------------------------------------------------------
def save_pretrained(model: T5, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> str:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` in the Hugging Face layout.

    ``transformers.T5ForConditionalGeneration`` (or ``T5EncoderModel`` for an encoder-only model) loads the
    result with no missing or unexpected keys. Each file is written atomically.
    """
    from safetensors.torch import save_file

    from protlm.utils import atomic_path

    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in canonical_state(model).items()}
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    model.config.save_json(os.path.join(directory, "config.json"), encoder_only=model.encoder_only)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def random_init(name_or_config: str | T5Config, seed: int = 0, encoder_only: bool = False) -> Pretrained:
    """A randomly initialised model of a preset (or config) with protlm's vocabulary, for tests and baselines."""
    from protlm.config import preset

    config = preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if config.vocab_size < 256:
        # A random model has no vocabulary of its own; it gets protlm's 256-id one (published shapes with
        # 128 or 144 ids are widened, which changes only the embedding and LM-head rows).
        config = config.replace(vocab_size=256)
    torch.manual_seed(seed)
    model = T5(config, encoder_only=encoder_only).eval()
    return Pretrained(model, protlm_tokenizer(), config, f"random-init {name_or_config if isinstance(name_or_config, str) else 'config'} seed={seed}")
