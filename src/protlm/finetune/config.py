"""What a fine-tuning run changes in the backbone: the ``finetune:`` section of a suite (``--set finetune.KEY=V``).

The head, its training protocol (learning rate, warm-up, epochs, accumulation, seeds) and the metrics stay the
frozen benchmark's (``training:``); this section only says how the backbone takes part:

- ``lora``: low-rank adapters (Hu et al. 2021) on the attention projections of every block, trained with the
  head while the backbone's own weights stay frozen; ``lora_ffn`` adds the feed-forward projections.
- ``full``: every backbone weight trains, except the embeddings and the first ``freeze_first`` blocks when
  ``freeze_first`` > 0.

Backbone parameters get their own peak learning rate (``adapter_lr`` / ``backbone_lr``) under the head's
schedule (the same warm-up and linear decay, scaled per parameter group). A backbone learning rate of 0 gives
exactly the frozen run, which the tests use as a check.
"""

from __future__ import annotations

from dataclasses import dataclass

from protlm.errors import ConfigError

MODES = ("frozen", "lora", "full")
MODE_LABELS = {"frozen": "frozen", "lora": "LoRA", "full": "full FT"}


@dataclass
class FinetuneConfig:
    lora_rank: int = 8  # r of every adapter
    lora_alpha: float = 16.0  # adapters add (alpha / r) * B A x
    lora_dropout: float = 0.05  # dropout on an adapter's input, training only
    lora_targets: list[str] | None = None  # module-name suffixes; None: the family's attention q, k, v, o
    lora_ffn: bool = False  # with the default targets: adapt the feed-forward projections too
    adapter_lr: float = 3e-4  # peak learning rate of the LoRA weights
    backbone_lr: float = 1e-5  # peak learning rate of the backbone under full fine-tuning
    freeze_first: int = 0  # full fine-tuning: keep the embeddings and the first N blocks frozen (0: train all)
    checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory, ~1.3x time)
    train_dropout: bool = False  # backbone dropout active while training (off: the backbone runs as in eval)

    def __post_init__(self) -> None:
        if int(self.lora_rank) < 1:
            raise ConfigError(f"finetune.lora_rank must be >= 1, got {self.lora_rank!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"finetune.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.adapter_lr < 0 or self.backbone_lr < 0:
            raise ConfigError("finetune.adapter_lr and finetune.backbone_lr must be >= 0")
        if int(self.freeze_first) < 0:
            raise ConfigError(f"finetune.freeze_first must be >= 0, got {self.freeze_first!r}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("finetune.lora_targets must name at least one module (or be left out for the "
                              "family's attention projections)")


def parse_modes(text: str, option: str = "--finetune") -> list[str]:
    """``frozen,lora`` -> ["frozen", "lora"]; an unknown mode is a one-line error listing the valid ones."""
    modes = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"{option} {text}: unknown mode {m!r}; use one or more of {', '.join(MODES)}, "
                              "comma-separated (e.g. frozen,lora)")
    if not modes:
        raise ConfigError(f"{option}: give one or more of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))
