"""Pretraining: configuration, optimizers and schedules, checkpoints, metrics and the training loop."""

from protlm.train.config import TrainConfig, load_config
from protlm.train.optim import build_optimizer, lr_at
from protlm.train.trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "build_optimizer", "load_config", "lr_at"]
