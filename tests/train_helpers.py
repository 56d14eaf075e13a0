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


# --- a miniature ablation (tests/test_ablate.py, tests/test_readme.py) ----------------------------------------
EVAL = os.path.join(DATA, "eval")

# A miniature benchmark suite on the vendored excerpts (SSP-3, GB1, and a dataset that is absent on purpose).
MINI_SUITE = {
    "name": "mini",
    "data_root": EVAL,
    "seeds": [7, 0, 42],
    "training": {"epochs": 1, "warmup_steps": 2, "grad_accum": 4, "precision": "fp32"},
    "quick": {"training": {"epochs": 1}, "max_train": 10, "max_valid": 4, "max_test": 8},
    "datasets": {
        "flip_ss3": {"format": "flip_ss", "files": {"sequences": "flip_ss3_sequences.fasta",
                                                    "labels": "flip_ss3_labels.fasta", "mask": "flip_ss3_mask.fasta"}},
        "gb1": {"format": "flip_csv", "files": {"path": "gb1_three_vs_rest_excerpt.csv"}},
        "absent": {"format": "ss_csv", "files": {"all": "not_here.csv"}, "unavailable": "not reachable in tests"},
    },
    "tasks": [
        {"name": "SSP-3", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
         "train": "flip_ss3/train", "valid": "flip_ss3/valid", "test": {"NEW364": "flip_ss3/test"}},
        {"name": "GB1", "kind": "protein_regression", "label": "fitness", "train": "gb1/train", "valid": "gb1/valid",
         "test": {"FLIP": "gb1/test"}},
        {"name": "Absent", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
         "train": "absent", "valid": {"holdout": 0.5}, "test": {"x": "absent"}},
    ],
}


def mini_ablation_recipe(tmp_path, suite=None, **changes) -> str:
    """A miniature recipe: the trainer tests' odd-shaped model on the E. coli excerpt, 2 variants x 2 seeds."""
    base = write_config(tmp_path, tmp_path / "unused", run={"steps": 60, "batch_size": 8, "micro_batch_size": 8,
                                                            "precision": "fp32", "threads": 1},
                        eval={"every": 2, "batch_size": 8}, checkpoint={"every": 2, "keep": 1})
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite or MINI_SUITE, sort_keys=False))
    recipe = {
        "name": "mini",
        "output_dir": str(tmp_path / "ablation"),
        "base_config": base,
        "pretrain_seeds": [0, 1],
        "token_budget": 2000,
        "variants": {
            "A": {"description": "denoise 15%", "set": {"objective.task_probs": {"denoise": 1.0},
                                                        "objective.mask_rates": [0.15]}},
            "C": {"description": "Ankh3 recipe", "set": {"objective.task_probs": {"denoise": 0.5, "complete": 0.5}}},
        },
        "evaluation": {"suite": str(suite_path), "quick": True, "tasks": ["SSP-3", "GB1"]},
        "depth": {"input": os.path.join(DATA, "ecoli_k12_excerpt.fasta"), "max_proteins": 6, "max_length": 40,
                  "probe_task": "ssp3", "probe_data": os.path.join(DATA, "ssp3_flip_excerpt"),
                  "probe_train": 8, "probe_test": 4},
        "stats": {"compare": ["C", "A"], "bootstrap": 200},
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)
