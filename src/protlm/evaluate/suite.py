"""Benchmark suites: a YAML file naming datasets, tasks, the head and the training protocol.

Top-level keys (see ``configs/eval/ankh3.yaml`` for a complete example):

- ``name``: used for the default output directory;
- ``data_root``: relative dataset paths are under it (``--data-root`` or ``$PROTLM_DATA`` override it; a
  relative ``data_root`` is taken from the current directory);
- ``seeds``: one head is trained per seed; results are mean ± std over them;
- ``head``: :class:`~protlm.evaluate.heads.HeadConfig` fields;
- ``training``: :class:`~protlm.evaluate.training.TrainConfig` fields (a task's ``training:`` overrides them);
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
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from protlm.errors import ConfigError
from protlm.evaluate.heads import HeadConfig
from protlm.evaluate.tasks import TaskSpec
from protlm.evaluate.training import TrainConfig
from protlm.utils import read_yaml_mapping

TOP_KEYS = ("name", "description", "data_root", "seeds", "head", "training", "quick", "datasets", "tasks")
QUICK_KEYS = ("training", "max_train", "max_valid", "max_test", "max_folds", "seeds")


@dataclass
class DatasetSpec:
    name: str
    format: str
    files: dict[str, str]  # key -> path (absolute after resolution)
    unavailable: str = ""  # why the data may be absent; such a dataset is skipped, not an error

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
    name: str
    data_root: str
    seeds: list[int]
    head: HeadConfig
    training: dict[str, Any]  # suite-level TrainConfig fields (raw, so tasks can override single keys)
    quick: QuickProfile
    datasets: dict[str, DatasetSpec]
    tasks: list[TaskSpec]
    source: str = ""
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # the resolved YAML (saved beside the results)

    def train_config(self, task: TaskSpec, quick: bool = False) -> TrainConfig:
        merged = {**self.training, **task.training}
        if quick:
            merged.update(self.quick.training)
        return _build(TrainConfig, merged, f"{self.source}: task {task.name!r} training")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"{self.source}: no task {name!r} (tasks: {', '.join(t.name for t in self.tasks)})")


def _build(cls, data: dict[str, Any], where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    try:
        return cls(**data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """One ``key=value`` edit of the raw suite mapping; the value is YAML (``1e-3``, ``[7, 0]``, ``true``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # tasks, addressed by name
            match = [t for t in node if isinstance(t, dict) and t.get("name") == part]
            if not match:
                raise ConfigError(f"--set {key}: no task named {part!r}")
            node = match[0]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])!r} is not a section")
        if part not in node:
            # sections that default to empty may be created (e.g. a task's own training overrides)
            if part in ("training", "files", "head", "quick"):
                node[part] = {}
            else:
                hint = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                raise ConfigError(f"--set {key}: unknown key {part!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])!r} is not a section")
    node[parts[-1]] = value


def load_suite(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), data_root: str | None = None) -> Suite:
    source = os.fspath(path)
    data = read_yaml_mapping(source, "suite file")
    for item in overrides:
        apply_override(data, item)
    return parse_suite(data, source, data_root)


def parse_suite(data: dict[str, Any], source: str = "<suite>", data_root: str | None = None) -> Suite:
    for key in data:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    root = data_root or os.environ.get("PROTLM_DATA") or data.get("data_root") or "."
    root = os.path.abspath(os.path.expanduser(root))
    seeds = data.get("seeds", [7, 0, 42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
    head = _build(HeadConfig, data.get("head") or {}, f"{source}: head")
    training = dict(data.get("training") or {})
    _build(TrainConfig, training, f"{source}: training")  # check it now, not at the first task
    quick = _build(QuickProfile, data.get("quick") or {}, f"{source}: quick")
    datasets = {}
    for name, spec in (data.get("datasets") or {}).items():
        if not isinstance(spec, dict) or "format" not in spec or "files" not in spec:
            raise ConfigError(f"{source}: dataset {name!r} needs 'format' and 'files'")
        unknown = set(spec) - {"format", "files", "unavailable"}
        if unknown:
            raise ConfigError(f"{source}: dataset {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        files = {str(k): os.path.join(root, os.path.expanduser(str(v))) for k, v in (spec["files"] or {}).items()}
        datasets[name] = DatasetSpec(name, spec["format"], files, spec.get("unavailable", ""))
    tasks = []
    for i, t in enumerate(data.get("tasks") or []):
        if not isinstance(t, dict) or "name" not in t:
            raise ConfigError(f"{source}: task {i + 1} needs a name")
        spec = _build(TaskSpec, t, f"{source}: task {t['name']!r}")
        for ds in spec.datasets():
            if ds not in datasets:
                raise ConfigError(f"{source}: task {spec.name!r} uses unknown dataset {ds!r}")
        _build(TrainConfig, {**training, **spec.training}, f"{source}: task {spec.name!r} training")
        tasks.append(spec)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: task names must be unique ({', '.join(names)})")
    if not tasks:
        raise ConfigError(f"{source}: no tasks")
    raw = copy.deepcopy(data)
    raw["data_root"] = root
    return Suite(str(data.get("name", "suite")), root, seeds, head, training, quick, datasets, tasks, source,
                 str(data.get("description", "")), raw)


def table4_differences(cfg: TrainConfig, head: HeadConfig) -> list[str]:
    """Settings that differ from the paper's Table 4 (for the report's deviation list)."""
    ref_t, ref_h = TrainConfig(), HeadConfig()
    out = []
    for key in ("lr", "warmup_steps", "epochs", "batch_size", "grad_accum", "weight_decay"):
        if getattr(cfg, key) != getattr(ref_t, key):
            out.append(f"{key} {getattr(cfg, key)} (Table 4: {getattr(ref_t, key)})")
    for key in ("num_layers", "ff_ratio", "num_heads", "dropout", "kernel_size"):
        if getattr(head, key) != getattr(ref_h, key):
            out.append(f"head {key} {getattr(head, key)} (Table 4: {getattr(ref_h, key)})")
    return out
