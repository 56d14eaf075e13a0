"""Process groups and data parallelism, applied to a model from outside.

The model code never knows it is distributed. :func:`parallelize` takes a plain :class:`~protlm.model.T5` and
- wraps it in ``DistributedDataParallel`` ("ddp"), or
- shards it with FSDP2 ("fsdp"): ``fully_shard`` on every encoder and decoder block, then on the root (which
  then holds the shared embedding, the LM head and the final norms), as torchtitan does. The first block of
  each stack is the exception: it owns the relative position-bias table, which the stack reads before any
  block runs, so it stays in the root's group (gathered for the whole forward; 2 blocks of 72 in Ankh3);
and optionally recomputes each block in backward (activation checkpointing) first. A model built on the meta
device gets its storage and weights after sharding, so no process ever holds the whole model.

One code path serves 1 CPU process and many GPUs on many nodes: run under ``torchrun`` and the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) says which process this is.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from protlm.errors import ConfigError


@dataclass
class DistEnv:
    """Where this process stands among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_minutes: int = 30, backend: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's environment (a single process needs none).

    ``device`` "auto" picks this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU. The
    backend is NCCL on GPUs and gloo on CPUs, unless ``backend`` names one.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device is cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if backend == "nccl" else None)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (a no-op for one process); returns ``t``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` as held by rank ``src``, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- model wrapping ------------------------------------------------------------------------------------------
def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every stack (encoder first), the units of sharding and recomputation."""
    out = []
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if stack is not None:
            out.extend(stack.block)
    return out


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's forward during backward instead of keeping its activations.

    The block's ``forward`` is replaced on the instance rather than wrapping the module, so parameter names
    (and with them checkpoints and the Hugging Face export) stay exactly as they are.
    """
    for blk in blocks(model):
        if getattr(blk, "_protlm_checkpointed", False):
            continue
        inner = blk.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        blk.forward = forward
        blk._protlm_checkpointed = True


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if strategy == "auto":
        return "ddp" if env.distributed else "none"
    if strategy in ("ddp", "fsdp") and not env.distributed and not dist.is_initialized():
        return "none"  # one process: nothing to synchronise
    return strategy


def parallelize(model: nn.Module, strategy: str, env: DistEnv, activation_checkpointing: bool = False,
                materialize: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Place ``model`` on ``env.device`` and apply recomputation and the data-parallel ``strategy``.

    A model built on the meta device comes with ``materialize``, which gives it storage on ``env.device`` and
    its initial weights. It runs after FSDP2 has sharded the model, so each process allocates only its shards
    (torchtitan's order); DDP and a single process need the whole model, so there it runs before wrapping.

    Returns the module to call for training: the DDP wrapper, or ``model`` itself (FSDP2 and "none" modify it
    in place). Use :func:`unwrap` to reach the T5 underneath.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    strategy = resolve_strategy(strategy, env)
    if strategy not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"run.parallel must be one of auto, none, ddp, fsdp; got {strategy!r}")
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if materialize is None:
            model.to(env.device)
        for blk in blocks(model):
            if not _owns_position_bias(blk):
                fully_shard(blk)
        fully_shard(model)
        if materialize is not None:
            materialize(model)
        return model
    if materialize is not None:
        materialize(model)
    model.to(env.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def _owns_position_bias(block: nn.Module) -> bool:
    return any(name.endswith("relative_attention_bias.weight") for name, _ in block.named_parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 modifies the module in place, so it is its own)."""
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip (``enabled=False``) or do the gradient all-reduce of this backward pass.

    Gradient accumulation syncs only on the last micro-batch of a step; that saves communication, and with
    FSDP2 the unsharded gradients of the earlier micro-batches are kept until then.
    """
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()
