"""Checkpoint I/O in the Hugging Face layout."""

from protlm.convert.checkpoint import Pretrained, UnshardedDraws, build_model, load, materialize, random_init, read_config, read_weights, save_pretrained

__all__ = ["Pretrained", "UnshardedDraws", "build_model", "load", "materialize", "random_init", "read_config", "read_weights", "save_pretrained"]
