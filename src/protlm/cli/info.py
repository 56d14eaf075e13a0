"""``protlm info MODEL``: what a checkpoint or preset is (shape, family, vocabulary, parameters)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint directory, Hub id or preset")
    p.add_argument("model", help="checkpoint directory, Hub id, or preset name (see --presets)")
    p.add_argument("--presets", action="store_true", help="list the presets and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from protlm.config import PRESET_NAMES

    if args.presets:
        print("\n".join(PRESET_NAMES))
        return 0
    from protlm.cli.common import load_model

    pre = load_model(args.model, random_init=args.model in PRESET_NAMES)
    n = sum(p.numel() for p in pre.model.parameters())
    print(f"source        {pre.source}")
    print(f"family        {pre.config.protlm_family} ({pre.model.kind})")
    for name, value in describe(pre):
        print(f"{name:<14}{value}")
    print(f"parameters    {n:,}")
    return 0


def describe(pre) -> list[tuple[str, str]]:
    """(field, text) rows for the shape and the vocabulary, in each family's own terms."""
    from protlm.config import BertConfig, EsmConfig, GPT2Config

    cfg, tok = pre.config, pre.tokenizer
    if isinstance(cfg, GPT2Config):
        return [
            ("shape", f"n_embd={cfg.n_embd} n_inner={cfg.n_inner or 4 * cfg.n_embd} heads={cfg.n_head}x"
                      f"{cfg.n_embd // cfg.n_head} layers={cfg.n_layer} positions={cfg.n_positions} (learned) "
                      f"activation={cfg.activation_function}"),
            ("windows", f"up to {pre.model.max_residues} residues (whose tokens surely fit {cfg.n_positions} "
                        "positions); longer proteins are embedded in overlapping windows"),
            ("heads", "LM head (tied to wte)" if pre.model.lm_head is not None else "none (embeddings only)"),
            ("vocabulary", f"{len(tok)} byte-level BPE tokens from {tok.source}; <|endoftext|> {tok.eot_id}; "
                           "no task tokens"),
        ]
    if isinstance(cfg, BertConfig):
        return [
            ("shape", f"hidden={cfg.hidden_size} ffn={cfg.intermediate_size} heads={cfg.num_attention_heads}x"
                      f"{cfg.hidden_size // cfg.num_attention_heads} layers={cfg.num_hidden_layers} (post-LN) "
                      f"positions={cfg.max_position_embeddings} (learned) activation={cfg.hidden_act}"),
            ("windows", f"up to {pre.model.max_residues} residues (its positions less [CLS] and [SEP]); longer "
                        "proteins are embedded in overlapping windows"),
            ("heads", "MLM head (tied to the word embeddings)" if pre.model.cls is not None else "none (embeddings only)"),
            ("vocabulary", f"{len(tok)} tokens from {tok.source}; [CLS] {tok.bos_id}, [SEP] {tok.eos_id}, "
                           f"[MASK] {tok.mask_id}, [PAD] {tok.pad_id}; no task tokens"),
        ]
    if getattr(pre.model, "kind", None) == "hf-encoder":
        return [("shape", f"{cfg.model_type} through transformers' AutoModel (fallback: embed and evaluate only): "
                          f"hidden={cfg.hidden_size} layers={cfg.num_hidden_layers}"),
                ("vocabulary", f"{len(tok)} tokens from {tok.source}")]
    if isinstance(cfg, EsmConfig):
        d_head = cfg.hidden_size // cfg.num_attention_heads
        parts = [name for name, present in (("LM head", pre.model.lm_head is not None),
                                            ("contact head", pre.model.esm.contact_head is not None))
                 if present]
        return [
            ("shape", f"hidden={cfg.hidden_size} ffn={cfg.intermediate_size} heads={cfg.num_attention_heads}x{d_head} "
                      f"layers={cfg.num_hidden_layers} positions={cfg.position_embedding_type} "
                      f"token_dropout={cfg.token_dropout}"),
            ("windows", f"up to {pre.model.max_residues} residues (its training crops); longer proteins are "
                        "embedded in overlapping windows"),
            ("heads", ", ".join(parts) or "none (embeddings only)"),
            ("vocabulary", f"{len(tok)} tokens from {tok.source}; <cls> {tok.bos_id}, <eos> {tok.eos_id}, "
                           f"<mask> {tok.mask_id}, <pad> {tok.pad_id}; no task tokens"),
        ]
    return [
        ("shape", f"d_model={cfg.d_model} d_ff={cfg.d_ff} heads={cfg.num_heads}x{cfg.d_kv} "
                  f"layers={cfg.num_layers}+{0 if pre.model.encoder_only else cfg.n_decoder_layers} "
                  f"ffn={cfg.feed_forward_proj}"),
        ("vocabulary", f"{len(tok)} tokens from {tok.source}; prefixes {sorted(tok.prefix_ids)}; "
                       f"{len(tok.sentinel_ids)} sentinels"),
    ]
