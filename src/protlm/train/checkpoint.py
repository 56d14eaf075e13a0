"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<N>/`` holding
- ``model`` and ``optim`` tensors, written with ``torch.distributed.checkpoint`` (each process writes its own
  shards, so an FSDP2 run never gathers the model on one process; a 1-process run writes one file);
- ``rank_<r>.pt`` per process: RNG states (torch, CUDA, numpy, python) and the data position;
- ``meta.json``: the step, the number of processes and the model config, written last.

Writing is atomic: everything goes to ``.tmp-step_<N>`` and rank 0 renames it once all processes are done, so
a kill at any moment leaves either the complete checkpoint or none. Only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from protlm.distributed import DistEnv, barrier
from protlm.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


@dataclass
class Found:
    step: int
    path: str


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[Found]:
    """Complete checkpoints (those with ``meta.json``), oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, META)):
            found.append(Found(int(m.group(1)), os.path.join(root, name)))
    return sorted(found, key=lambda f: f.step)


def latest_checkpoint(output_dir: str) -> Found | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str) -> None:
    """Delete ``.tmp-*`` directories left by a process killed while writing (rank 0 only)."""
    root = checkpoints_dir(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --- RNG -----------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load ---------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv, rank_state: dict[str, Any], meta: dict[str, Any], keep: int) -> str:
    """Write the checkpoint of ``step`` (every process calls this) and prune to the newest ``keep``."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    if env.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save({**rank_state, "rng": rng_state()}, os.path.join(tmp, f"rank_{env.rank}.pt"))
    barrier()
    if env.is_main:
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as fh:
            json.dump({**meta, "step": step, "world_size": env.world_size}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(final):  # the same step written again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    barrier()
    return final


def read_meta(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, META), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read {META} ({err})") from None


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer and this process's RNG; returns this process's saved state (data position...).

    The caller checks ``meta.json`` (model config, number of processes) first with :func:`read_meta`.
    """
    rank_file = os.path.join(path, f"rank_{env.rank}.pt")
    if not os.path.exists(rank_file):
        raise CheckpointError(f"{path}: no state for rank {env.rank} (was the run started with fewer processes?)")
    _materialise_optimizer_state(model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as err:  # a truncated or foreign directory: name it, do not dump DCP internals
        raise CheckpointError(f"{path}: cannot read model/optimizer tensors ({type(err).__name__}: {err})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    try:
        saved = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{rank_file}: cannot read ({type(err).__name__}: {err})") from None
    set_rng_state(saved.pop("rng"))
    return saved


def _materialise_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (values are overwritten by the load).

    A fresh optimizer has no per-parameter state, so the state-dict template that ``dcp.load`` fills would be
    empty. One step with zero gradients and lr 0 creates the state without moving any parameter.
    """
    if optimizer.state:
        return
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, saved_lr):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
