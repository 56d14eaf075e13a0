"""The data and recipes that ship with protlm for ``protlm demo``: a real corpus, real evaluation sets, and two
plain YAML files (the pretraining recipe and the evaluation suite), all under ``protlm/resources/demo``.

Paths inside the YAML files are relative to that folder; this module resolves them, so the demo runs from any
working directory and from a non-editable install.
"""

from __future__ import annotations

import os
from importlib import resources

from protlm.evaluate import Suite, load_suite
from protlm.settings import override
from protlm.train import TrainConfig, load_config

RECIPE = "pretrain.yaml"
SUITE = "suite.yaml"
VALIDATION = "corpus/flip_bind_validation.fasta.gz"  # held-out proteins when the recipe names no validation file
PROBE_DATA = "ssp_netsurfp"  # the FLIP secondary-structure files the depth analysis' probes read
PROJECTION_SET = ("cb513",)  # the suite's dataset whose proteins are mapped in 2D


def bundle_dir() -> str:
    """The folder holding the demo data (a real directory: protlm is installed unzipped)."""
    return str(resources.files("protlm") / "resources" / "demo")


def bundled(relative: str) -> str:
    return os.path.join(bundle_dir(), relative)


def _resolve(path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(bundle_dir(), path))


def pretrain_config(output_dir: str, minutes: float | None = None, threads: int | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The bundled recipe with its data paths made absolute and the demo's output directory, time and threads."""
    cfg = load_config(bundled(RECIPE), overrides)
    paths = ("train", "validation", "exclude_sequences", "exclude_ids")
    changes = {"output_dir": os.fspath(output_dir),
               **{f"data.{key}": [_resolve(p) for p in getattr(cfg.data, key)] for key in paths}}
    if minutes is not None:
        changes["run.time_limit_minutes"] = float(minutes)
    if threads:
        changes["run.threads"] = threads
    cfg = override(cfg, changes, bundled(RECIPE))
    cfg.validate(bundled(RECIPE))
    return cfg


def default_minutes() -> float:
    """The recipe's own time limit: the default of ``protlm demo --minutes``."""
    return float(load_config(bundled(RECIPE)).run.time_limit_minutes)


def held_out_proteins_file() -> str:
    """The recipe's first validation file: proteins kept out of pretraining, read by the depth analysis and the
    completion stage."""
    validation = load_config(bundled(RECIPE)).data.validation
    return _resolve(validation[0]) if validation else bundled(VALIDATION)


def demo_suite() -> Suite:
    return load_suite(bundled(SUITE), data_root=bundle_dir())
