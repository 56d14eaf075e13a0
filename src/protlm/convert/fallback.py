"""Any other Hub encoder (ProtAlbert, ProtElectra, ...) through transformers' ``AutoModel``: embed and evaluate only.

protlm's first-class families (T5, ESM-2/DPLM, GPT-2, BERT) are its own compact modules with block-level access.
A checkpoint of another ``model_type`` that transformers knows is loaded here instead, as a fallback that the log
marks: the network is transformers' own (``AutoModel``, run with ``output_hidden_states``), so protlm sees only
its per-layer outputs. Layer l is transformers' ``hidden_states[l]`` (0: the embedding output, N: the last
one, whatever norm the architecture applies there).

The vocabulary is the checkpoint's, through ``AutoTokenizer``, read into protlm's table lookup: each of the 20
standard residues must be one token of its own (written plainly or space-separated, whichever the tokenizer
reads one residue per token), and the tokenizer must wrap a protein in at most one opening and exactly one
closing token. Rare residues the vocabulary lacks (U/Z/O/B) are read as X. A tokenizer that fails these checks
(SaProt's residue+structure tokens, for example) is refused in one line.

Commands that need blocks (``analyze depth``, ``infill``, ``score``) refuse such a model: :func:`refuse_fallback`.
transformers is the optional extra ``protlm[hf]``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from protlm.config import HiddenSizeNames
from protlm.errors import CheckpointError, ConfigError
from protlm.model.protocol import StackOutput, resolve_layers
from protlm.tokenizer.vocab import RARE, STANDARD, Tokenizer

KIND = "hf-encoder"
FIRST_CLASS = "T5 (Ankh, ProtT5), ESM-2, DPLM, GPT-2 (ProtGPT2) and BERT (ProtBERT)"
INSTALL_HINT = "pip install 'protlm[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def known_to_transformers(model_type: str) -> bool:
    tf = _transformers()
    if tf is None:
        return False
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@dataclass
class HFEncoderConfig(HiddenSizeNames):
    """What protlm reads of a fallback model's config.json; ``data`` is the whole file (its hash is its identity)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    max_position_embeddings: int | None
    data: dict[str, Any] = field(default_factory=dict, repr=False)
    protlm_family: str = KIND

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str) -> "HFEncoderConfig":
        tf = _transformers()
        if tf is None:
            raise ConfigError(f"{source}: model_type {data.get('model_type')!r} needs transformers ({INSTALL_HINT})")
        cfg = tf.AutoConfig.for_model(**data)
        width = getattr(cfg, "hidden_size", None)
        layers = getattr(cfg, "num_hidden_layers", None)
        if not isinstance(width, int) or not isinstance(layers, int):
            raise ConfigError(f"{source}: model_type {data['model_type']!r} has no hidden_size/num_hidden_layers; "
                              "protlm's fallback takes encoders only")
        return cls(data["model_type"], width, layers, getattr(cfg, "max_position_embeddings", None), dict(data))

    @property
    def n_decoder_layers(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.data.items() if k not in ("transformers_version", "_name_or_path")},
                "protlm_family": self.protlm_family}

    def to_hf_dict(self, encoder_only: bool = True) -> dict[str, Any]:
        return dict(self.data)

    def replace(self, **changes: Any) -> "HFEncoderConfig":
        return dataclasses.replace(self, **changes)


class HFEncoderStack(nn.Module):
    """transformers' base model as a protlm encoder stack: whole runs only (no blocks)."""

    is_decoder = False

    def __init__(self, hf: nn.Module, n_layers: int):
        super().__init__()
        self.hf = hf
        self._n = n_layers
        # the fp16 overflow guard hooks every block: there are none to hook (non-finite outputs are still caught)
        self.block = nn.ModuleList()

    @property
    def n_layers(self) -> int:
        return self._n

    def resolve_layers(self, layers) -> list[int]:
        return resolve_layers(self._n, layers, "encoder")

    def _no_blocks(self, *args, **kwargs):
        raise ConfigError(f"this model was loaded through transformers' AutoModel (fallback), which gives no "
                          f"block-level access; block-wise analyses support {FIRST_CLASS} models")

    embed = self_mask = final_layer_norm = _no_blocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        wanted = self.resolve_layers(output_layers)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states
        if len(hidden) != self._n + 1:
            raise ConfigError(f"transformers returned {len(hidden)} hidden states for a {self._n}-layer encoder")
        return StackOutput(hidden[-1], {l: hidden[l] for l in wanted})


class HFEncoder(nn.Module):
    """The model-protocol face of a fallback encoder: ``kind`` "hf-encoder", an encoder stack and nothing else."""

    kind = KIND
    encoder_only = True
    decoder = None
    lm_head = None

    def __init__(self, config: HFEncoderConfig, hf: nn.Module):
        super().__init__()
        self.config = config
        self.stack = HFEncoderStack(hf, config.num_hidden_layers)

    @property
    def encoder(self) -> HFEncoderStack:
        return self.stack

    @property
    def max_residues(self) -> int | None:
        # the learned positions, less the opening and closing tokens
        n = self.config.max_position_embeddings
        return max(1, n - 2) if isinstance(n, int) else None

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_layers=None) -> StackOutput:
        return self.stack(input_ids, attention_mask, output_layers=output_layers)


def refuse_fallback(model, command: str) -> None:
    """A one-line error for commands that need block-level access or an LM head on a fallback model."""
    if getattr(model, "kind", None) == KIND:
        raise ConfigError(f"{command} needs block-level access, which a model loaded through transformers' "
                          f"AutoModel (fallback) does not give; it supports {FIRST_CLASS} models")


# --- the tokenizer ---------------------------------------------------------------------------------------------
def wrap_tokenizer(hf_tok, source: str) -> Tokenizer:
    """protlm's table-lookup Tokenizer with the ids ``hf_tok`` gives each residue and its opening/closing tokens."""
    residue_ids, spaced = None, False
    for spaced in (False, True):
        residue_ids = _probe_residues(hf_tok, spaced)
        if residue_ids is not None:
            break
    if residue_ids is None:
        raise CheckpointError(f"{source}: cannot map residues to tokens (the tokenizer does not read each of the 20 "
                              "standard residues as one token of its own, written plainly or space-separated)")
    sep = " " if spaced else ""
    probe = sep.join(STANDARD)
    full = hf_tok(probe)["input_ids"]
    body = [residue_ids[a] for a in STANDARD]
    start = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
    if start is None or start > 1 or len(full) - start - len(body) != 1:
        raise CheckpointError(f"{source}: the tokenizer wraps a protein as {hf_tok.convert_ids_to_tokens(full)[:2]}... "
                              "; protlm needs at most one opening and exactly one closing token")
    for aa in "X" + RARE:  # X and the rare residues where the vocabulary reads them as one token
        ids = hf_tok(aa, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != hf_tok.unk_token_id:
            residue_ids[aa] = ids[0]
    aliases = {r: "X" for r in RARE if r not in residue_ids and "X" in residue_ids}
    vocab = dict(hf_tok.get_vocab())
    tok = Tokenizer(vocab, residue_ids, space_separated=spaced, aliases=aliases, source=source)
    # the specials as the checkpoint's tokenizer names them, whatever their spelling
    tok.bos_id = full[0] if start == 1 else None
    tok.eos_id = full[-1]
    tok.pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else tok.eos_id
    tok.mask_id = hf_tok.mask_token_id
    if hf_tok.unk_token_id is not None:
        tok.unk_id = hf_tok.unk_token_id
    tok.x_id = residue_ids.get("X", tok.unk_id)
    tok.special_ids = frozenset(i for i in vocab.values() if i not in set(residue_ids.values()))
    return tok


def _probe_residues(hf_tok, spaced: bool) -> dict[str, int] | None:
    ids = hf_tok((" " if spaced else "").join(STANDARD), add_special_tokens=False)["input_ids"]
    if len(ids) != len(STANDARD) or hf_tok.unk_token_id in ids or len(set(ids)) != len(STANDARD):
        return None
    out = dict(zip(STANDARD, ids))
    for aa, i in out.items():  # each residue alone reads as the same token
        if hf_tok(aa, add_special_tokens=False)["input_ids"] != [i]:
            return None
    return out


# --- loading ---------------------------------------------------------------------------------------------------
def load_hf_encoder(directory: str, data: dict[str, Any], source: str):
    """A :class:`protlm.convert.Pretrained` whose model is transformers' ``AutoModel`` of ``directory``."""
    from protlm.convert.checkpoint import Pretrained

    tf = _transformers()
    if tf is None:
        raise CheckpointError(f"{directory}: model_type {data.get('model_type')!r} is not a protlm family; other Hub "
                              f"encoders load through transformers' AutoModel: {INSTALL_HINT}")
    config = HFEncoderConfig.from_hf_dict(data, source)
    try:
        hf_tok = tf.AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # transformers raises many types for missing or corrupt files
        raise CheckpointError(f"{directory}: cannot read the tokenizer with transformers' AutoTokenizer "
                              f"({type(err).__name__}: {err})") from None
    tokenizer = wrap_tokenizer(hf_tok, directory)
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # its load report lists the task head it drops (an MLM head): not protlm's concern
    try:
        hf = tf.AutoModel.from_pretrained(directory, dtype=torch.float32)
    except Exception as err:
        raise CheckpointError(f"{directory}: transformers' AutoModel cannot load it ({type(err).__name__}: {err})") from None
    finally:
        tf.logging.set_verbosity(verbosity)
    print(f"protlm: {source}: model_type {config.model_type!r} is not a protlm family; loaded through transformers' "
          f"AutoModel {type(hf).__name__} (fallback: embed and evaluate only)", file=sys.stderr)
    return Pretrained(HFEncoder(config, hf.eval()).eval(), tokenizer, config, directory)


def fallback_wanted(data: dict[str, Any], source: str) -> bool:
    """Whether a config.json goes to the fallback: a model_type protlm has no family for and transformers knows.
    Without transformers, such a model_type is refused with the install hint."""
    from protlm.config import SUPPORTED_MODEL_TYPES, _model_type

    model_type = _model_type(data)
    if model_type in SUPPORTED_MODEL_TYPES + ("umt5",):
        return False
    if _transformers() is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a protlm family ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                          f"other Hub encoders load through transformers' AutoModel: {INSTALL_HINT}")
    return known_to_transformers(model_type)


def random_init_refusal(name: str) -> ConfigError:
    return ConfigError(f"{name}: random-init twins need a protlm family ({FIRST_CLASS}); this model loads only "
                       "through transformers' AutoModel")


__all__ = ["HFEncoder", "HFEncoderConfig", "KIND", "load_hf_encoder", "refuse_fallback", "wrap_tokenizer",
           "fallback_wanted", "random_init_refusal"]
