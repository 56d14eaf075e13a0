"""The pretraining configuration: a tree of dataclasses read from YAML, with ``--set key=value`` overrides.

Every field is declared, typed and documented here. Reading is strict: an unknown key or a value of the
wrong type is a :class:`ConfigError` that names the dotted key and the file (or ``--set``) it came from, so a
typo never trains silently with a default. Run state (step, data position, RNG) is never stored here; it
lives in checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from protlm.data.exclude import SharedSegments
from protlm.errors import ConfigError
from protlm.objectives import ObjectiveConfig
from protlm.precision import check
from protlm.settings import build, override, parse_sets, plain
from protlm.utils import read_yaml_mapping


@dataclass
class ModelSection:
    """Which network to train."""

    preset: str = "tiny"  # a protlm preset (protlm info x --presets lists them)
    overrides: dict[str, Any] = field(default_factory=dict)  # T5Config fields that differ from the preset
    init_from: str | None = None  # a checkpoint directory to start from instead of a random init
    # Init of an untied LM head when starting from random weights. "t5x": normal with std d_model**-0.5, as in
    # T5X/flaxformer (fan-in variance scaling), the code Ankh3 was trained with; "hf": the model's own init,
    # transformers' std 1.0, whose logits start ~sqrt(d_model) wide (initial loss in the tens of nats).
    lm_head_init: Literal["t5x", "hf"] = "t5x"


@dataclass
class DataSection:
    """Where sequences come from and what is kept out."""

    train: list[str] = field(default_factory=list)  # FASTA / FASTA.gz / parquet / HF datasets directories
    validation: list[str] = field(default_factory=list)  # held-out FASTA files for validation loss
    # Evaluation proteins to keep out of training: FASTA/CSV files whose sequences are dropped wherever they
    # occur, and id lists (one per line, or a FASTA whose record ids are taken).
    exclude_sequences: list[str] = field(default_factory=list)
    exclude_ids: list[str] = field(default_factory=list)
    exclude_validation: bool = True  # also drop the validation sequences from training
    # Near copies of the excluded sequences (domains cut from them, tagged or trimmed versions, fragments) are
    # dropped too: a training sequence goes when >= exclude_kmer_fraction of its k-mers, or >=
    # exclude_kmer_count of them, occur in the excluded sequences (protlm.data.exclude). 0 = exact match only.
    exclude_kmer: int = 10
    exclude_kmer_fraction: float = 0.5
    exclude_kmer_count: int = 50
    max_length: int = 512  # encoder tokens per example, special tokens included; longer sequences are cropped
    min_length: int = 1  # residues; shorter sequences are dropped
    policy: Literal["skip", "error"] = "skip"  # bad FASTA records: "skip" (count and warn) or "error"
    validation_sequences: int = 512  # at most this many validation sequences (the first ones, in file order)
    workers: int = 0  # DataLoader worker processes preparing batches; 0 prepares them in the training process

    def __post_init__(self) -> None:
        try:
            self.near_copies()  # checks the thresholds when the config is read
        except ConfigError as err:
            raise ConfigError(f"data.exclude_kmer, exclude_kmer_fraction, exclude_kmer_count: {err}") from None

    def near_copies(self) -> SharedSegments:
        return SharedSegments(self.exclude_kmer, self.exclude_kmer_fraction, self.exclude_kmer_count)


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule."""

    name: Literal["adafactor", "adamw"] = "adafactor"  # "adafactor" (torch.optim.Adafactor, as in Ankh3) or "adamw"
    lr: float = 1e-2  # peak learning rate
    schedule: Literal["rsqrt", "cosine", "constant"] = "rsqrt"  # "rsqrt" (T5: constant in warmup, then lr*sqrt(warmup/step)), "cosine", "constant"
    warmup_steps: int = 10_000  # rsqrt: length of the constant phase; cosine: linear ramp from 0
    min_lr_ratio: float = 0.1  # cosine: final lr as a fraction of lr
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 disables (the norm is logged either way)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw only
    eps: float = 1e-8  # adamw only
    adafactor_beta2_decay: float = -0.8  # adafactor: second-moment decay exponent (T5 value)
    adafactor_clip: float = 1.0  # adafactor: update clipping threshold ("d" in torch.optim.Adafactor)


@dataclass
class RunSection:
    """The training loop."""

    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # sequences per optimizer step, summed over all processes
    micro_batch_size: int = 8  # sequences per forward pass on one process; the rest is gradient accumulation
    # "auto" (bf16 where this device runs it fast: GPUs with bf16, CPUs where a measured bf16 matmul beats fp32;
    # else fp32; see protlm.precision), "bf16" (autocast, fp32 weights and optimizer) or "fp32"
    precision: str = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # "auto" (ddp when several processes, else none), "none", "ddp", "fsdp"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto" (cuda when available), "cpu", "cuda"
    seed: int = 0  # model init, data order and objective draws all derive from it
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # Stop early (validate, checkpoint, export) once this many minutes of training have passed; 0 = no limit.
    # The step reached is in the logs; --resume with a later limit continues the same run.
    time_limit_minutes: float = 0.0
    # Stop early (validate, checkpoint, export) once this many tokens have gone through the model; 0 = no budget.
    # A token is a non-padding encoder input or decoder input position, summed over processes (see
    # Trainer.run); the step that crosses the budget is completed, so a run overshoots by less than one step.
    # The count is kept in checkpoints, so a resumed run stops at the same budget.
    token_budget: float = 0.0


@dataclass
class LogSection:
    """What is written, and how often."""

    every: int = 10  # steps between metric records (JSONL, TensorBoard)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on rank 0
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = a table for known GPUs, or a matmul measured on CPU


@dataclass
class EvalSection:
    """Validation on held-out sequences."""

    every: int = 500  # steps between validation passes; 0 disables
    batch_size: int = 16
    seed: int = 1234  # draws of the validation examples (fixed for the whole run, so curves are comparable)
    baseline_sequences: int = 20000  # training sequences counted for the unigram (residue frequency) baseline


@dataclass
class CheckpointSection:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # newest checkpoints kept; older ones are deleted
    export: bool = True  # write the final model in the Hugging Face layout to <output_dir>/final


@dataclass
class TrainConfig:
    """A pretraining run."""

    output_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def validate(self, source: str = "config") -> None:
        """Checks across fields that no single type annotation expresses."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key} {why}")

        check(self.run.precision, "training", f"{source}: run.precision")
        positive = {"run.steps": self.run.steps, "run.batch_size": self.run.batch_size,
                    "run.micro_batch_size": self.run.micro_batch_size, "data.max_length": self.data.max_length,
                    "log.every": self.log.every, "eval.batch_size": self.eval.batch_size,
                    "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep}
        for key, value in positive.items():
            if value <= 0:
                raise bad(key, f"must be positive, got {value}")
        if self.optim.lr <= 0:
            raise bad("optim.lr", f"must be positive, got {self.optim.lr}")
        if self.optim.warmup_steps < 0:
            raise bad("optim.warmup_steps", "must be >= 0")
        if len(self.optim.betas) != 2:
            raise bad("optim.betas", f"must hold two numbers, got {self.optim.betas}")
        if self.run.token_budget < 0:
            raise bad("run.token_budget", f"must be >= 0, got {self.run.token_budget}")
        if self.data.workers < 0:
            raise bad("data.workers", "must be >= 0")
        if self.eval.every < 0:
            raise bad("eval.every", "must be >= 0")
        if not self.data.train:
            raise bad("data.train", "lists no training files")
        if self.data.max_length < 8:
            raise bad("data.max_length", f"is too short to hold an example, got {self.data.max_length}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per process per step; the global batch must split evenly."""
        per_step = self.run.micro_batch_size * world_size
        if self.run.batch_size % per_step:
            raise ConfigError(
                f"run.batch_size={self.run.batch_size} is not a multiple of run.micro_batch_size "
                f"({self.run.micro_batch_size}) x processes ({world_size})"
            )
        return self.run.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --- reading -------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe (or start from the defaults) and apply ``--set key=value`` overrides
    (:func:`protlm.settings.parse_sets`)."""
    source = "defaults" if path is None else os.fspath(path)
    data = {} if path is None else read_yaml_mapping(source, "config file")
    cfg = build(TrainConfig, data, source)
    changes = parse_sets(overrides)
    if changes:
        cfg = override(cfg, changes, "--set")
    cfg.validate(source + (" with --set" if changes else ""))
    return cfg
