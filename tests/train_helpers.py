"""A tiny odd-shaped pretraining recipe for the trainer tests (real E. coli / CATH excerpts, seconds per run)."""

from __future__ import annotations

import copy
import json
import os

import yaml

from tests.conftest import DATA

ODD_MODEL = dict(d_model=40, d_kv=12, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20, initializer_factor=0.5)

BASE = {
    "model": {"preset": "debug", "overrides": ODD_MODEL},
    "data": {"train": [os.path.join(DATA, "ecoli_k12_excerpt.fasta")],
             "validation": [os.path.join(DATA, "cath_s20_excerpt.fasta")],
             "max_length": 48, "validation_sequences": 12},
    "optim": {"lr": 1.0e-2, "warmup_steps": 3},
    "run": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "precision": "fp32", "threads": 1},
    "log": {"every": 1, "tensorboard": False, "progress": False},
    "eval": {"every": 3, "batch_size": 5},
    "checkpoint": {"every": 3, "keep": 2},
}


def write_config(directory, output_dir, **sections) -> str:
    """A YAML recipe under ``directory`` writing to ``output_dir``; ``sections`` update BASE per section."""
    data = copy.deepcopy(BASE)
    data["output_dir"] = str(output_dir)
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name].update(values)
        else:
            data[name] = values
    path = os.path.join(str(directory), "recipe.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh)
    return path


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(str(output_dir), "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def train_losses(output_dir) -> dict[int, float]:
    """Step -> global training loss of that step (needs log.every 1)."""
    return {r["step"]: r["train/all/loss"] for r in read_metrics(output_dir) if "train/all/loss" in r}


def val_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["val/all/loss"] for r in read_metrics(output_dir) if "val/all/loss" in r}
