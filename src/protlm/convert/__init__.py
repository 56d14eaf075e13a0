"""Checkpoint I/O in the Hugging Face layout."""

from protlm.convert.checkpoint import Pretrained, load, random_init, read_weights, save_pretrained

__all__ = ["Pretrained", "load", "random_init", "read_weights", "save_pretrained"]
