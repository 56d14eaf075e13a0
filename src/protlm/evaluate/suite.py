"""Benchmark suites: a YAML file naming datasets, tasks, the head and the training protocol.

Top-level keys (see ``configs/eval/ankh3.yaml`` for a complete example):

- ``name``: used for the default output directory;
- ``data_root``: relative dataset paths are under it (``--data-root`` or ``$PROTLM_DATA`` override it; a
  relative ``data_root`` is taken from the current directory);
- ``seeds``: one head is trained per seed; results are mean ± std over them;
- ``head``: :class:`~protlm.evaluate.heads.HeadConfig` fields;
- ``training``: :class:`~protlm.evaluate.training.HeadTrainConfig` fields (a task's ``training:`` overrides them);
- ``finetune``: :class:`~protlm.finetune.config.FinetuneConfig` fields, for ``--finetune lora|full`` columns;
- ``quick``: the smoke-test profile (``--quick``): ``training`` overrides plus ``max_train`` / ``max_valid`` /
  ``max_test`` (proteins per split, a fixed random subset) and ``max_folds`` (leave-one-out folds);
- ``datasets``: name -> ``{format, files: {key: path}, unavailable: "why"}``; a dataset whose files are all
  absent and that carries ``unavailable`` is skipped with that reason in the report (instead of an error);
- ``tasks``: a list of :class:`~protlm.evaluate.tasks.TaskSpec` mappings.

``--set key=value`` edits the parsed YAML before it is checked: ``training.epochs=5``, ``seeds=[7]``,
``tasks.SSP-3.training.warmup_steps=100`` (tasks are addressed by name), ``datasets.gb1.files.path=...``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from protlm.errors import ConfigError
from protlm.evaluate.heads import HeadConfig
from protlm.evaluate.tasks import TaskSpec
from protlm.evaluate.training import HeadTrainConfig
from protlm.settings import apply, build, parse_sets
from protlm.utils import read_yaml_mapping


@dataclass
class DatasetSpec:
    format: str
    files: dict[str, str]  # key -> path (absolute after resolution)
    unavailable: str = ""  # why the data may be absent; such a dataset is skipped, not an error
    name: str = field(default="", init=False)  # its key under ``datasets:``

    def missing_files(self) -> list[str]:
        return [p for p in self.files.values() if not os.path.exists(p)]


@dataclass
class QuickProfile:
    training: dict[str, Any] = field(default_factory=dict)
    max_train: int | None = None
    max_valid: int | None = None
    max_test: int | None = None
    max_folds: int | None = None
    seeds: list[int] | None = None


@dataclass
class Suite:
    """A suite file as read (the keys are the fields that are not ``init=False``)."""

    name: str = "suite"
    description: str = ""
    data_root: str | None = None  # absolute after reading
    seeds: list[int] = field(default_factory=lambda: [7, 0, 42])
    head: HeadConfig = field(default_factory=HeadConfig)
    # suite-level HeadTrainConfig fields, kept raw so that a task's training: can override single keys
    training: dict[str, Any] = field(default_factory=dict)
    quick: QuickProfile = field(default_factory=QuickProfile)
    # protlm.finetune.config.FinetuneConfig fields: how the backbone trains under --finetune lora|full
    finetune: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)
    source: str = field(default="", init=False)
    raw: dict[str, Any] = field(default_factory=dict, init=False)  # the resolved YAML (saved beside the results)

    def train_config(self, task: TaskSpec, quick: bool = False) -> HeadTrainConfig:
        merged = {**self.training, **task.training}
        if quick:
            merged.update(self.quick.training)
        return build(HeadTrainConfig, merged, self.source, f"tasks.{task.name}.training.")

    def finetune_config(self):
        from protlm.finetune.config import FinetuneConfig

        return build(FinetuneConfig, self.finetune, self.source, "finetune.")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"{self.source}: no task {name!r} (tasks: {', '.join(t.name for t in self.tasks)})")


def load_suite(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), data_root: str | None = None) -> Suite:
    """Read a suite file; ``overrides`` are ``--set key=value`` edits of its YAML (:mod:`protlm.settings`)."""
    source = os.fspath(path)
    data = read_yaml_mapping(source, "suite file")
    apply(data, parse_sets(overrides), Suite)
    return parse_suite(data, source, data_root)


def parse_suite(data: dict[str, Any], source: str = "<suite>", data_root: str | None = None) -> Suite:
    suite = build(Suite, data, source)
    root = os.path.abspath(os.path.expanduser(data_root or os.environ.get("PROTLM_DATA") or suite.data_root or "."))
    if not suite.seeds:
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, got []")
    build(HeadTrainConfig, suite.training, source, "training.")  # check it now, not at the first task
    suite.source = source
    suite.finetune_config()
    for name, spec in suite.datasets.items():
        spec.name = name
        spec.files = {k: os.path.join(root, os.path.expanduser(v)) for k, v in spec.files.items()}
    for task in suite.tasks:
        for ds in task.datasets():
            if ds not in suite.datasets:
                raise ConfigError(f"{source}: task {task.name!r} uses unknown dataset {ds!r}")
        build(HeadTrainConfig, {**suite.training, **task.training}, source, f"tasks.{task.name}.training.")
    names = [t.name for t in suite.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: task names must be unique ({', '.join(names)})")
    if not suite.tasks:
        raise ConfigError(f"{source}: no tasks")
    suite.data_root, suite.source = root, source
    suite.raw = {**copy.deepcopy(data), "data_root": root}
    return suite


def table4_differences(cfg: HeadTrainConfig, head: HeadConfig) -> list[str]:
    """Settings that differ from the paper's Table 4 (for the report's deviation list)."""
    ref_t, ref_h = HeadTrainConfig(), HeadConfig()
    out = []
    for key in ("lr", "warmup_steps", "epochs", "batch_size", "grad_accum", "weight_decay"):
        if getattr(cfg, key) != getattr(ref_t, key):
            out.append(f"{key} {getattr(cfg, key)} (Table 4: {getattr(ref_t, key)})")
    for key in ("num_layers", "ff_ratio", "num_heads", "dropout", "kernel_size"):
        if getattr(head, key) != getattr(ref_h, key):
            out.append(f"head {key} {getattr(head, key)} (Table 4: {getattr(ref_h, key)})")
    return out
