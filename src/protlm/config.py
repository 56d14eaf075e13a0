"""Model configuration: one dataclass that mirrors the Hugging Face T5 ``config.json``.

Field names and meanings are those of ``transformers.T5Config`` so that a published ``config.json`` reads
directly and a saved one loads in ``transformers``. Presets carry the published model shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from protlm.errors import ConfigError
from protlm.settings import build

FFN_KINDS = ("relu", "gated-gelu", "gated-silu", "gated-relu", "gelu", "silu")
FAMILIES = ("ankh", "ankh3", "prot-t5", "custom")

# Keys that the Hugging Face T5 config.json carries but that do not change the network. They are accepted
# when reading a config.json and dropped; any other unknown key is an error (a typo must not pass silently).
_HF_PASSIVE_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "output_past", "is_gated_act", "dense_act_fn", "classifier_dropout", "n_positions",
    "gradient_checkpointing", "task_specific_params", "tokenizer_class", "max_length", "bos_token_id",
    "is_encoder_decoder", "initializer_factor", "torchscript", "return_dict", "output_hidden_states",
    "output_attentions", "id2label", "label2id", "problem_type", "prefix", "diversity_penalty",
    "finetuning_task", "xla_device", "num_beams", "early_stopping", "no_repeat_ngram_size",
    "length_penalty", "min_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "chunk_size_feed_forward", "add_cross_attention", "tie_encoder_decoder", "pruned_heads",
    "use_return_dict", "sep_token_id", "cross_attention_hidden_size", "decoder_start_token_ids",
    "is_decoder",
})


# What ``transformers.T5Config`` assumes for a key its config.json leaves out. Published files hold only some keys
# (Rostlab/prot_t5_xl_uniref50 has no tie_word_embeddings, for example), and ``save_pretrained`` may omit values
# equal to the class defaults, so a missing key must mean what transformers makes of it, not protlm's own
# default. Checked against the installed transformers in tests/test_config.py.
HF_T5_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
    feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)


@dataclass
class T5Config:
    """Shape and numerics of a T5 encoder-decoder (field names follow ``transformers.T5Config``)."""

    vocab_size: int = 256  # rows of the embedding matrix and of the LM head
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head; inner attention width is num_heads * d_kv
    d_ff: int = 1024  # hidden width of the feed-forward block
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int | None = None  # decoder blocks; None means "same as num_layers", 0 means encoder-only
    num_heads: int = 8
    relative_attention_num_buckets: int = 32  # log-spaced relative-position buckets
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    feed_forward_proj: str = "gated-gelu"  # "relu" (T5 v1.0, ProtT5), "gated-gelu" (Ankh), "gated-silu" (Ankh2/3)
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False  # True: LM head shares the input embedding and rescales by d_model**-0.5
    dropout_rate: float = 0.0
    initializer_factor: float = 1.0  # scales the random init (T5's Mesh-TF scheme)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # protlm-only: which published family the weights belong to. It picks the default prefix token for
    # embeddings and the residue spelling (ProtT5 space-separates residues). transformers ignores it.
    protlm_family: str = "custom"

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FFN_KINDS:
            raise ConfigError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use one of {', '.join(FFN_KINDS)}"
            )
        if self.protlm_family not in FAMILIES:
            raise ConfigError(f"protlm_family={self.protlm_family!r} is not one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ConfigError(f"num_layers must be a non-negative integer, got {self.num_layers!r}")
        if self.num_decoder_layers is not None and (
            not isinstance(self.num_decoder_layers, int) or self.num_decoder_layers < 0
        ):
            raise ConfigError(f"num_decoder_layers must be a non-negative integer, got {self.num_decoder_layers!r}")

    @property
    def n_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.split("-")[-1]

    # --- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self, encoder_only: bool = False) -> dict[str, Any]:
        """The ``config.json`` content that ``transformers`` reads without warnings."""
        d = self.to_dict()
        d["num_decoder_layers"] = self.n_decoder_layers
        act = self.activation
        d.update(
            model_type="t5",
            architectures=["T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"],
            is_encoder_decoder=not encoder_only,
            is_gated_act=self.is_gated,
            dense_act_fn="gelu_new" if act == "gelu" else act,
            use_cache=True,
        )
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", strict: bool = True) -> "T5Config":
        """Build from a dict. Unknown keys are an error naming ``source``; known Hugging Face keys that do not
        affect the network are dropped when ``strict`` is False (reading a published config.json)."""
        if not strict:
            if isinstance(data.get("scale_decoder_outputs"), bool):
                # transformers 5.x writes tie_word_embeddings=True for every T5 and keeps the checkpoint's own
                # setting (the d_model**-0.5 rescale of a tied head) in scale_decoder_outputs.
                data = {**data, "tie_word_embeddings": data["scale_decoder_outputs"]}
                del data["scale_decoder_outputs"]
            fields = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in fields or k not in _HF_PASSIVE_KEYS}
        if data.get("feed_forward_proj") == "gated-gelu_new":
            data = {**data, "feed_forward_proj": "gated-gelu"}
        return build(cls, data, source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "T5Config":
        return cls.from_hf_dict(read_json_object(path), os.fspath(path))

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str) -> "T5Config":
        """The content of a ``config.json`` as transformers reads it (missing keys take its T5 defaults)."""
        if data.get("model_type", "t5") not in ("t5", "mt5", "umt5"):
            raise ConfigError(f"{source}: model_type {data.get('model_type')!r} is not a T5 model")
        if data.get("model_type", "t5") == "t5":
            data = {**HF_T5_DEFAULTS, **data}
        return cls.from_dict(data, source=source, strict=False)

    def save_json(self, path: str | os.PathLike, encoder_only: bool = False) -> None:
        from protlm.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_hf_dict(encoder_only), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "T5Config":
        return T5Config.from_dict({**self.to_dict(), **changes}, source="override")


# --- presets -------------------------------------------------------------------------------------------------
# Published shapes. Ankh3 values are from the Ankh3 paper, Table 1 (seeds/000). Ankh and Ankh2 values, and the
# fields the Ankh3 paper does not state (eps, pad/eos ids), follow the published config.json files of
# ElnaggarLab/ankh-base, ElnaggarLab/ankh-large and ElnaggarLab/ankh2-large on the Hugging Face Hub.
# ProtT5-XL follows Rostlab/prot_t5_xl_uniref50's config.json, which leaves tie_word_embeddings at the T5
# default (True) and uses 32 buckets, d_kv 128 and ReLU (ProtTrans paper, Elnaggar et al. 2021).
_PRESETS: dict[str, dict[str, Any]] = {
    "ankh-base": dict(
        vocab_size=144, d_model=768, d_kv=64, d_ff=3072, num_layers=48, num_decoder_layers=24, num_heads=12,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        protlm_family="ankh",
    ),
    "ankh-large": dict(
        vocab_size=144, d_model=1536, d_kv=64, d_ff=3840, num_layers=48, num_decoder_layers=24, num_heads=16,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        protlm_family="ankh",
    ),
    "ankh2-large": dict(
        vocab_size=144, d_model=1536, d_kv=64, d_ff=3840, num_layers=48, num_decoder_layers=24, num_heads=16,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-silu",
        protlm_family="ankh",
    ),
    "ankh3-large": dict(
        vocab_size=256, d_model=1536, d_kv=64, d_ff=3840, num_layers=48, num_decoder_layers=24, num_heads=16,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-silu",
        protlm_family="ankh3",
    ),
    "ankh3-xl": dict(
        vocab_size=256, d_model=2560, d_kv=64, d_ff=6720, num_layers=48, num_decoder_layers=24, num_heads=32,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-silu",
        protlm_family="ankh3",
    ),
    "prot-t5-xl": dict(
        vocab_size=128, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_decoder_layers=24, num_heads=32,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
        tie_word_embeddings=True, protlm_family="prot-t5",
    ),
    # CPU-scale Ankh3-layout models (protlm's own vocabulary of 256 ids).
    "debug": dict(
        vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=1, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=64, feed_forward_proj="gated-silu",
        protlm_family="ankh3",
    ),
    "tiny": dict(
        vocab_size=256, d_model=256, d_kv=32, d_ff=640, num_layers=6, num_decoder_layers=3, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-silu",
        protlm_family="ankh3",
    ),
    "small": dict(
        vocab_size=256, d_model=512, d_kv=64, d_ff=1280, num_layers=12, num_decoder_layers=6, num_heads=8,
        relative_attention_num_buckets=64, relative_attention_max_distance=128, feed_forward_proj="gated-silu",
        protlm_family="ankh3",
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object, with one-line errors naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def preset(name: str, **overrides: Any) -> T5Config:
    """A named published (or CPU-scale) shape, optionally with fields overridden."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return T5Config.from_dict({**_PRESETS[name], **overrides}, source=f"preset {name}")
