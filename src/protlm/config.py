"""Model configuration: one dataclass per family, mirroring the Hugging Face ``config.json`` of that family.

Field names and meanings are those of ``transformers.T5Config`` and ``transformers.EsmConfig`` so that a published
``config.json`` reads directly and a saved one loads in ``transformers``. A key a file leaves out means what
transformers' config class makes of it. Presets carry the published model shapes. :func:`config_from_hf_dict`
picks the family from ``model_type``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

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

# transformers.MT5Config's defaults (an mT5 v1.1 shape). Its head is untied and not rescaled: tie_word_embeddings
# false in transformers 4.x and in the published google/mt5-* files; transformers 5 ties it but never rescales.
HF_MT5_DEFAULTS: dict[str, Any] = {**HF_T5_DEFAULTS, **dict(
    vocab_size=250112, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)}


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
    tie_word_embeddings: bool = False  # True: the LM head shares the input embedding matrix
    # The d_model**-0.5 rescale of the decoder output before the LM head. None: the same as tie_word_embeddings, the
    # one setting of T5 v1.0 and of transformers 4.x. transformers 5 ties every T5 head and keeps the rescale here,
    # so a model built with it can be tied without the rescale.
    scale_decoder_outputs: bool | None = None
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
        if self.scale_decoder_outputs and not self.tie_word_embeddings:
            raise ConfigError("scale_decoder_outputs=true needs tie_word_embeddings=true (no T5 rescales an untied head)")

    @property
    def rescale_head(self) -> bool:
        """Whether the decoder output is scaled by d_model**-0.5 before the LM head."""
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

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
        d = dataclasses.asdict(self)
        if d["scale_decoder_outputs"] is None:  # unset: left out, so config hashes of earlier runs stay valid
            del d["scale_decoder_outputs"]
        return d

    def to_hf_dict(self, encoder_only: bool = False) -> dict[str, Any]:
        """The ``config.json`` content that ``transformers`` 4.x and 5.x read without warnings, and the same way.

        A head tied without the rescale (only transformers 5 makes one) is written as an untied head with no
        rescale, and :func:`protlm.convert.save_pretrained` stores ``lm_head.weight``: 4.x cannot express the
        pair, and both versions then compute the same logits.
        """
        d = self.to_dict()
        d["num_decoder_layers"] = self.n_decoder_layers
        d["tie_word_embeddings"] = self.tie_word_embeddings and self.rescale_head
        d["scale_decoder_outputs"] = self.rescale_head
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
        model_type = data.get("model_type", "t5")
        if model_type == "umt5":
            raise ConfigError(f"{source}: model_type 'umt5' is not supported (UMT5 gives every layer its own position "
                              "bias; protlm's T5 shares the first layer's, as T5, mT5, Ankh and ProtT5 do)")
        if model_type not in ("t5", "mt5"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not a T5 model")
        data = {**(HF_MT5_DEFAULTS if model_type == "mt5" else HF_T5_DEFAULTS), **data}
        if data.get("scale_decoder_outputs") == data.get("tie_word_embeddings", cls.tie_word_embeddings):
            # the one setting of transformers 4.x, written out in full: kept as "same as the tie"
            data = {k: v for k, v in data.items() if k != "scale_decoder_outputs"}
        return cls.from_dict(data, source=source, strict=False)

    def save_json(self, path: str | os.PathLike, encoder_only: bool = False) -> None:
        from protlm.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_hf_dict(encoder_only), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "T5Config":
        return T5Config.from_dict({**self.to_dict(), **changes}, source="override")


# --- ESM-2 (and DPLM, which keeps ESM-2's architecture) ------------------------------------------------------
ESM_FAMILIES = ("esm2", "dplm", "custom")

# Keys of an ESM config.json that do not change the network protlm builds. ``vocab_list`` and
# ``esmfold_config`` belong to ESMFold; ``dplm_type`` names DPLM's wrapper class (its weights are ESM-2's).
_HF_ESM_PASSIVE_KEYS = _HF_PASSIVE_KEYS | frozenset({
    "vocab_list", "esmfold_config", "is_folding_model", "dplm_type", "hidden_act", "type_vocab_size",
})

# transformers.EsmConfig's defaults for keys a config.json leaves out (checked in tests/test_esm.py). Note that
# they are BERT's, not ESM-2's: a file without position_embedding_type means absolute positions.
HF_ESM_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=1026, initializer_range=0.02, layer_norm_eps=1e-12,
    position_embedding_type="absolute", emb_layer_norm_before=None, token_dropout=False, tie_word_embeddings=True,
    rope_theta=10000.0, mask_token_id=None, pad_token_id=None, eos_token_id=2,
)


class HiddenSizeNames:
    """The width/depth names the workflows read (``d_model``, ``num_layers``) for configs that use transformers'
    BERT-style keys (``hidden_size``, ``num_hidden_layers``): ESM, BERT and the AutoModel fallback."""

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers


class _SingleStackConfig:
    """What every single-stack family config (ESM, GPT-2, BERT) shares: serialisation in its transformers class's
    ``config.json`` and the width/depth names the workflows read. A subclass names ``MODEL_TYPE`` and its
    ``ARCHITECTURES`` (without the head, with it)."""

    MODEL_TYPE: str = ""
    ARCHITECTURES: tuple[str, str] = ("", "")

    @property
    def n_decoder_layers(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self, encoder_only: bool = False) -> dict[str, Any]:
        """The ``config.json`` content that ``transformers`` reads (``ARCHITECTURES[0]`` without the head)."""
        return {**self.to_dict(), "model_type": self.MODEL_TYPE,
                "architectures": [self.ARCHITECTURES[0] if encoder_only else self.ARCHITECTURES[1]]}

    def save_json(self, path: str | os.PathLike, encoder_only: bool = False) -> None:
        from protlm.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_hf_dict(encoder_only), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any):
        return build(type(self), {**self.to_dict(), **changes}, "override")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
        return build(cls, data, source)


@dataclass
class EsmConfig(_SingleStackConfig, HiddenSizeNames):
    """Shape and numerics of an ESM-style masked LM (field names follow ``transformers.EsmConfig``).

    The defaults are ESM-2's conventions (rotary positions, token-dropout rescaling, eps 1e-5, its 33-token
    vocabulary) in the shape of esm2_t6_8M.
    """

    MODEL_TYPE = "esm"
    ARCHITECTURES = ("EsmModel", "EsmForMaskedLM")

    vocab_size: int = 33
    hidden_size: int = 320  # width of the residual stream
    num_hidden_layers: int = 6
    num_attention_heads: int = 20
    intermediate_size: int = 1280  # hidden width of the feed-forward block
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 1026  # ESM-2 was trained on crops of 1022 residues plus <cls> and <eos>
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    position_embedding_type: Literal["rotary", "absolute"] = "rotary"
    emb_layer_norm_before: bool | None = False  # a LayerNorm on the embeddings (ESM-1b); ESM-2 has none
    token_dropout: bool = True  # zero <mask> embeddings and rescale by the observed mask ratio (ESM-2 training)
    mask_token_id: int | None = 32
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = True  # the LM head's decoder shares the word embeddings
    rope_theta: float = 10000.0
    # protlm-only: the published family ("esm2", "dplm"); transformers ignores it.
    protlm_family: str = "custom"

    def __post_init__(self) -> None:
        if self.protlm_family not in ESM_FAMILIES:
            raise ConfigError(f"protlm_family={self.protlm_family!r} is not one of {', '.join(ESM_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            raise ConfigError(f"num_hidden_layers must be a non-negative integer, got {self.num_hidden_layers!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.position_embedding_type == "rotary" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("rotary positions need an even head width (hidden_size / num_attention_heads)")
        if self.position_embedding_type == "absolute" and self.pad_token_id is None:
            raise ConfigError("absolute positions count from pad_token_id, which is missing (null)")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str) -> "EsmConfig":
        """The content of an ESM ``config.json`` as transformers reads it (missing keys take its defaults)."""
        data = {**HF_ESM_DEFAULTS, **data}
        for key in ("vocab_size",):
            if data.get(key) is None:
                raise ConfigError(f"{source}: {key} is missing; an ESM config.json must give it")
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields or k not in _HF_ESM_PASSIVE_KEYS}
        if data.get("emb_layer_norm_before") is None:
            data["emb_layer_norm_before"] = False
        return build(cls, data, source)


# --- GPT-2 (ProtGPT2 keeps GPT-2's architecture) --------------------------------------------------------------
GPT2_FAMILIES = ("protgpt2", "custom")

# Keys of a GPT-2 config.json that do not change the network protlm builds: the sequence-classification summary
# head of GPT2DoubleHeadsModel, n_ctx (old files: always n_positions), and generation settings.
_HF_GPT2_PASSIVE_KEYS = _HF_PASSIVE_KEYS | frozenset({
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "n_ctx", "n_special", "predict_special_tokens", "pad_token_id", "unk_token_id",
})

# transformers.GPT2Config's defaults for keys a config.json leaves out (checked field by field in
# tests/test_gpt2.py): the GPT-2 small shape with OpenAI's vocabulary.
HF_GPT2_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
    initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
)
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")


@dataclass
class GPT2Config(_SingleStackConfig):
    """Shape and numerics of a GPT-2 decoder-only LM (field names follow ``transformers.GPT2Config``).

    The defaults are transformers' except dropout (0: protlm runs inference) and the ids, which are those of
    ProtGPT2's vocabulary (``<|endoftext|>`` is id 0 there).
    """

    MODEL_TYPE = "gpt2"
    ARCHITECTURES = ("GPT2Model", "GPT2LMHeadModel")

    vocab_size: int = 50257
    n_positions: int = 1024  # learned positions: the longest input in tokens
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # hidden width of the MLP; None: 4 * n_embd
    activation_function: str = "gelu_new"  # the tanh GELU
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True  # queries scaled by d_head**-0.5
    scale_attn_by_inverse_layer_idx: bool = False  # and by 1/(layer index + 1) (Mistral's stability trick)
    reorder_and_upcast_attn: bool = False  # fp32 attention scores; SDPA computes them in fp32 on every path
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    tie_word_embeddings: bool = True  # the LM head shares wte
    # protlm-only: the published family ("protgpt2"); transformers ignores it.
    protlm_family: str = "custom"

    def __post_init__(self) -> None:
        if self.protlm_family not in GPT2_FAMILIES:
            raise ConfigError(f"protlm_family={self.protlm_family!r} is not one of {', '.join(GPT2_FAMILIES)}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_layer, int) or self.n_layer < 0:
            raise ConfigError(f"n_layer must be a non-negative integer, got {self.n_layer!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.activation_function not in GPT2_ACTIVATIONS:
            raise ConfigError(f"activation_function={self.activation_function!r} is not supported; use one of "
                              f"{', '.join(GPT2_ACTIVATIONS)}")

    # the names the workflows read, whatever the family
    @property
    def d_model(self) -> int:
        return self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    def to_hf_dict(self, encoder_only: bool = False) -> dict[str, Any]:
        return {**super().to_hf_dict(encoder_only), "n_ctx": self.n_positions}  # the old name of n_positions

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str) -> "GPT2Config":
        """The content of a GPT-2 ``config.json`` as transformers reads it (missing keys take its defaults)."""
        if data.get("add_cross_attention"):
            raise ConfigError(f"{source}: add_cross_attention=true (a GPT-2 decoder of an encoder-decoder) is not "
                              "supported; protlm's GPT-2 is decoder-only")
        data = {**HF_GPT2_DEFAULTS, **data}
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields or k not in _HF_GPT2_PASSIVE_KEYS}
        return build(cls, data, source)


# --- BERT (ProtBERT, ProtBERT-BFD keep BERT's architecture) ----------------------------------------------------
BERT_FAMILIES = ("prot-bert", "custom")
BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# Keys of a BERT config.json that do not change the network protlm builds (the classifier's dropout; BertModel's
# decoder/cache settings, refused below when they would matter).
_HF_BERT_PASSIVE_KEYS = _HF_PASSIVE_KEYS | frozenset({
    "classifier_dropout", "gradient_checkpointing", "pooler_fc_size", "pooler_num_attention_heads",
    "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type", "directionality", "eos_token_id",
})

# transformers.BertConfig's defaults for keys a config.json leaves out (checked field by field in
# tests/test_bert.py). Rostlab/prot_bert's file gives neither layer_norm_eps nor pad_token_id (nor model_type).
HF_BERT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True,
)


@dataclass
class BertConfig(_SingleStackConfig, HiddenSizeNames):
    """Shape and numerics of a post-LN BERT masked LM (field names follow ``transformers.BertConfig``).

    The defaults are ProtBERT's conventions (its 30-token vocabulary, exact GELU, eps 1e-12, no dropout) in a
    CPU-scale shape.
    """

    MODEL_TYPE = "bert"
    ARCHITECTURES = ("BertModel", "BertForMaskedLM")

    vocab_size: int = 30
    hidden_size: int = 256  # width of the residual stream
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 1024  # hidden width of the feed-forward block
    hidden_act: str = "gelu"  # exact (erf) GELU, as ProtBERT
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512  # learned absolute positions: the longest input in tokens
    type_vocab_size: int = 2  # segment embeddings; protlm feeds segment 0, as transformers does by default
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True  # the MLM decoder shares the word embeddings
    position_embedding_type: str = "absolute"  # transformers 4.x also had relative_key(_query); not supported
    # protlm-only: the published family ("prot-bert"); transformers ignores it.
    protlm_family: str = "custom"

    def __post_init__(self) -> None:
        if self.protlm_family not in BERT_FAMILIES:
            raise ConfigError(f"protlm_family={self.protlm_family!r} is not one of {', '.join(BERT_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            raise ConfigError(f"num_hidden_layers must be a non-negative integer, got {self.num_hidden_layers!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.hidden_act not in BERT_ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; use one of {', '.join(BERT_ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise ConfigError(f"position_embedding_type={self.position_embedding_type!r} is not supported; protlm's "
                              "BERT has absolute positions (as ProtBERT and transformers 5)")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str) -> "BertConfig":
        """The content of a BERT ``config.json`` as transformers reads it (missing keys take its defaults)."""
        if data.get("is_decoder") or data.get("add_cross_attention"):
            raise ConfigError(f"{source}: is_decoder/add_cross_attention (a BERT decoder) is not supported; protlm's "
                              "BERT is a bidirectional encoder")
        data = {**HF_BERT_DEFAULTS, **data}
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields or k not in _HF_BERT_PASSIVE_KEYS}
        return build(cls, data, source)


def _model_type(data: dict[str, Any]) -> str:
    """A config.json's model_type; files written before transformers stored it (Rostlab/prot_bert's) name only
    their architecture."""
    if "model_type" in data:
        return data["model_type"]
    if any(str(a).startswith("Bert") for a in data.get("architectures") or []):
        return "bert"
    return "t5"


SUPPORTED_MODEL_TYPES = ("t5", "mt5", "esm", "gpt2", "bert")


def config_from_hf_dict(data: dict[str, Any], source: str) -> "T5Config | EsmConfig | GPT2Config | BertConfig":
    """The family's config for a ``config.json``, chosen by its ``model_type``."""
    model_type = _model_type(data)
    if model_type == "bert":
        cfg = BertConfig.from_hf_dict(data, source)
        if cfg.protlm_family == "custom" and cfg.vocab_size == 30:  # ProtBERT's (and ProtBERT-BFD's) vocabulary
            cfg = cfg.replace(protlm_family="prot-bert")
        return cfg
    if model_type == "esm":
        cfg = EsmConfig.from_hf_dict(data, source)
        if cfg.protlm_family == "custom":  # name the published family from what marks it
            if "dplm_type" in data or any("DPLM" in a for a in data.get("architectures") or []):
                cfg = cfg.replace(protlm_family="dplm")
            elif cfg.vocab_size == 33 and cfg.position_embedding_type == "rotary" and cfg.token_dropout:
                cfg = cfg.replace(protlm_family="esm2")
        return cfg
    if model_type == "gpt2":
        cfg = GPT2Config.from_hf_dict(data, source)
        if cfg.protlm_family == "custom" and (cfg.n_layer, cfg.n_embd, cfg.n_head) == (36, 1280, 20):
            cfg = cfg.replace(protlm_family="protgpt2")  # ProtGPT2's shape (nferruz/ProtGPT2 config.json)
        return cfg
    if model_type in ("t5", "mt5", "umt5"):
        return T5Config.from_hf_dict(data, source)  # umt5 is refused there, with the reason
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)})")


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

# ESM-2 shapes follow the published config.json files of facebook/esm2_t{6,12,30,33,36,48}_* (Lin et al.,
# Science 2023, Table S1); the names give the published parameter counts, checked in tests/test_esm.py. DPLM keeps
# ESM-2's architecture and vocabulary at 150M, 650M and 3B (Wang et al., ICML 2024; airkingbd/dplm_* configs).
_ESM_SHAPES = {
    "esm2_t6_8M": (6, 320, 20), "esm2_t12_35M": (12, 480, 20), "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20), "esm2_t36_3B": (36, 2560, 40), "esm2_t48_15B": (48, 5120, 40),
    "dplm_150m": (30, 640, 20), "dplm_650m": (33, 1280, 20), "dplm_3b": (36, 2560, 40),
}
_ESM_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(num_hidden_layers=n, hidden_size=d, num_attention_heads=h, intermediate_size=4 * d,
               protlm_family="dplm" if name.startswith("dplm") else "esm2")
    for name, (n, d, h) in _ESM_SHAPES.items()
}

# ProtGPT2 follows nferruz/ProtGPT2's model card (36 layers, 1280 wide, 738M parameters) and config.json (20
# heads, 1024 positions, GPT-2's 50257-entry vocabulary size); gpt2-medium is OpenAI's shape (for benchmarks);
# gpt2-tiny is a CPU-scale stand-in for tests and demos.
_GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "protgpt2": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024, protlm_family="protgpt2"),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256),
}

# ProtBERT follows Rostlab/prot_bert's config.json (30 layers, 1024 wide, 16 heads, FFN 4096, 40000 positions, 30
# tokens; ProtTrans, Elnaggar et al. 2021); bert-tiny is a CPU-scale stand-in in ProtBERT's vocabulary.
_BERT_PRESETS: dict[str, dict[str, Any]] = {
    "prot_bert": dict(num_hidden_layers=30, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                      vocab_size=30, max_position_embeddings=40000, protlm_family="prot-bert"),
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                      vocab_size=30, max_position_embeddings=256, protlm_family="prot-bert"),
}

PRESET_NAMES = tuple(_PRESETS) + tuple(_ESM_PRESETS) + tuple(_GPT2_PRESETS) + tuple(_BERT_PRESETS)


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


def preset(name: str, **overrides: Any) -> "T5Config | EsmConfig | GPT2Config | BertConfig":
    """A named published (or CPU-scale) shape, optionally with fields overridden."""
    if name in _ESM_PRESETS:
        return EsmConfig.from_dict({**_ESM_PRESETS[name], **overrides}, source=f"preset {name}")
    if name in _GPT2_PRESETS:
        return GPT2Config.from_dict({**_GPT2_PRESETS[name], **overrides}, source=f"preset {name}")
    if name in _BERT_PRESETS:
        return BertConfig.from_dict({**_BERT_PRESETS[name], **overrides}, source=f"preset {name}")
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return T5Config.from_dict({**_PRESETS[name], **overrides}, source=f"preset {name}")
