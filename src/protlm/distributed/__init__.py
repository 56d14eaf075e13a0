"""Data parallelism (DDP, FSDP2) and activation checkpointing, applied to a model from outside."""

from protlm.distributed.parallel import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    blocks,
    broadcast_object,
    gradient_sync,
    init_distributed,
    parallelize,
    resolve_strategy,
    shutdown,
    unwrap,
)

__all__ = [
    "DistEnv", "all_gather_object", "all_reduce_sum", "apply_activation_checkpointing", "barrier", "blocks", "broadcast_object",
    "gradient_sync", "init_distributed", "parallelize", "resolve_strategy", "shutdown", "unwrap",
]
