"""Residue tokenizers: protlm's Ankh3 layout, or a checkpoint's own vocabulary."""

from protlm.tokenizer.vocab import Batch, Tokenizer, ankh3_vocab, esm_tokenizer, load_tokenizer, protlm_tokenizer

__all__ = ["Batch", "Tokenizer", "ankh3_vocab", "esm_tokenizer", "load_tokenizer", "protlm_tokenizer"]
