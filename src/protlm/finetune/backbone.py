"""A backbone that trains with its head: per-residue features with gradients, for the head trainer.

The frozen protocol reads each protein's (L, D) features from an embeddings file; fine-tuning computes them in
every step from the residues, through the backbone, so that the loss reaches the backbone's weights (full
fine-tuning) or its LoRA adapters. Everything else is the frozen protocol's: the same head, packing, schedule,
seeds and metrics (:func:`protlm.evaluate.training.train_head` takes either kind of features).

The features are the ones ``protlm embed`` gives, with the same rules: the family's prefix and end token, one
row per residue (``<cls>``/task token and ``<eos>`` dropped; a BPE token's row for each residue it holds), the
layer chosen by ``layer``, and proteins longer than the model's window run as overlapping windows whose kept
ranges are stitched together (:func:`protlm.embedding.batching.split`). A cropped task example (``keep``) takes
its kept residues from the full protein's features, as the frozen protocol does.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import numpy as np
import torch

from protlm.embedding.batching import split
from protlm.embedding.engine import resolve_overlap, resolve_window, token_rows
from protlm.errors import ConfigError
from protlm.finetune.config import FinetuneConfig

ADAPTER_DIR = "adapter"  # inside a head bundle: the LoRA adapter, in PEFT's format
WEIGHTS_FILE = "backbone.safetensors"  # inside a head bundle: the fully fine-tuned backbone tensors


class BackboneFeatures:
    """Trainable per-residue features of task examples (see the module docstring).

    ``pretrained`` is a :class:`protlm.convert.Pretrained` (its model is copied, never changed); ``sequences``
    maps ``(dataset, id)`` to the protein's sequence. Call :meth:`start` once per training run, with the run's
    seed: it copies the base weights and adds fresh adapters (LoRA) or unfreezes the chosen blocks (full).
    """

    trainable = True

    def __init__(self, pretrained, mode: str, cfg: FinetuneConfig, sequences: dict[tuple[str, str], str], *,
                 layer: int = -1, prefix: str = "auto", device: torch.device | str = "cpu",
                 window: int | None = None, overlap: int | None = None, max_tokens: int = 4096):
        from protlm.embedding.run import resolve_prefix

        if mode not in ("lora", "full"):
            raise ConfigError(f"fine-tuning mode must be lora or full, got {mode!r}")
        self.base = pretrained
        self.mode, self.cfg = mode, cfg
        self.device = torch.device(device)
        stack = pretrained.model.encoder
        self.layer = stack.resolve_layers([layer])[0]
        self.prefix = resolve_prefix(prefix, pretrained)
        self.tokenizer = pretrained.tokenizer
        self.prefix_ids = self.tokenizer.prefix_token_ids(None if self.prefix == "none" else self.prefix)
        self.window = resolve_window(window, getattr(pretrained.model, "max_residues", None))
        self.overlap = resolve_overlap(self.window, overlap)
        self.max_tokens = max_tokens
        self.dim = int(pretrained.config.d_model)
        self._ids = {key: self.tokenizer.residue_array(seq, record=f"record {key[1]!r} of {key[0]}", unknown="x")
                     for key, seq in sequences.items()}
        self.model: torch.nn.Module | None = None

    # --- one training run --------------------------------------------------------------------------------------
    def start(self, seed: int) -> None:
        """Fresh trainable copy of the base model for a run with ``seed`` (adapters drawn from it, without
        touching the global RNG stream that the head's own initialisation and dropout use)."""
        from protlm.distributed import apply_activation_checkpointing

        model = copy.deepcopy(self.base.model).float().to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.mode == "lora":
            from protlm.finetune.lora import add_lora, resolve_targets

            targets = resolve_targets(model, self.cfg.lora_targets, self.cfg.lora_ffn)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed + 1_000_003)
                add_lora(model, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, dropout=self.cfg.lora_dropout,
                         targets=targets)
            model.to(self.device)
        else:
            for p in self.full_parameters(model):
                p.requires_grad_(True)
        if self.cfg.checkpointing:
            apply_activation_checkpointing(model)
        self.model = model
        self.train(False)

    def full_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The encoder weights full fine-tuning trains: all but the embeddings and the first ``freeze_first``
        blocks when ``freeze_first`` > 0 (the LM head and any decoder are not part of the features)."""
        stack = model.encoder
        n = self.cfg.freeze_first
        if n > stack.n_layers:
            raise ConfigError(f"finetune.freeze_first {n} is more than the model's {stack.n_layers} blocks")
        frozen = {id(p) for blk in list(stack.block)[:n] for p in blk.parameters()}
        if n > 0:
            frozen |= {id(p) for p in _embedding_parameters(stack)}
        # the features never pass the LM head, so its (possibly tied) weights only train through the embeddings
        return [p for p in stack.parameters() if id(p) not in frozen]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """The backbone's optimiser groups: its parameters at their own peak learning rate, no weight decay."""
        lr = self.cfg.adapter_lr if self.mode == "lora" else self.cfg.backbone_lr
        params = self.trainable_parameters()
        return [{"params": params, "lr": lr, "weight_decay": 0.0}] if params else []

    def train(self, mode: bool = True) -> None:
        """Training mode runs LoRA dropout, and the backbone's own dropout only with ``train_dropout``."""
        self.model.train(mode and self.cfg.train_dropout)
        if mode and self.mode == "lora":
            for name, m in self.model.named_modules():
                if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in f".{name}.":
                    m.train(True)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained weights (a copy): the adapters under LoRA, the trained backbone weights under full."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.trainable_parameters()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    # --- features ------------------------------------------------------------------------------------------------
    def __call__(self, example) -> np.ndarray:
        """One example's features as an array (no gradients), as stored features are read."""
        with torch.no_grad():
            return self.tensors([example])[0].float().cpu().numpy()

    def tensors(self, examples) -> list[torch.Tensor]:
        """(seen, D) features of each example, on the device, with gradients when grad is enabled."""
        keys = [(e.dataset, e.id) for e in examples]
        units = [u for i, k in enumerate(keys) for u in split(i, len(self._ids[k]), self.window, self.overlap)]
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for chunk in _chunks(units, self.max_tokens, len(self.prefix_ids) + 1):
            for u, rows in zip(chunk, self._forward(chunk, keys)):
                kept = rows[u.keep_start - u.start:u.keep_end - u.start]
                pieces.setdefault(u.seq, []).append((u.keep_start, kept))
        out = []
        for i, e in enumerate(examples):
            parts = [t for _, t in sorted(pieces[i], key=lambda p: p[0])]
            full = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            if e.keep is not None:
                full = full[torch.as_tensor(e.keep, device=full.device)]
            out.append(full)
        return out

    def _forward(self, units, keys) -> list[torch.Tensor]:
        pieces = [self._ids[keys[u.seq]][u.start:u.end] for u in units]
        rows, token_of = token_rows(self.tokenizer, self.prefix_ids, pieces)
        batch = self.tokenizer.pad(rows)
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        hidden = self.model.encoder(ids, mask, output_layers=[self.layer]).hidden_states[self.layer]
        n_pre = len(self.prefix_ids)
        if token_of is not None:
            return [hidden[i, torch.as_tensor(token_of[i], device=hidden.device)] for i in range(len(units))]
        return [hidden[i, n_pre:n_pre + u.length] for i, u in enumerate(units)]

    # --- what a head bundle keeps ----------------------------------------------------------------------------------
    def bundle_entry(self) -> dict[str, Any]:
        """``HeadMeta.finetune`` of a head trained with this backbone."""
        return {"mode": self.mode, "path": ADAPTER_DIR if self.mode == "lora" else WEIGHTS_FILE,
                **dataclasses.asdict(self.cfg)}

    def save(self, directory: str, state: dict[str, torch.Tensor]) -> None:
        """Write the trained part into a bundle directory: the adapter in PEFT's format (LoRA), or the trained
        backbone tensors under the model's own names (full)."""
        if self.mode == "lora":
            from protlm.evaluate.bundle import config_hash
            from protlm.finetune.lora import save_adapter

            self.load_state(state)
            save_adapter(self.model, os.path.join(directory, ADAPTER_DIR), base_model=self.base.source,
                         base_config_hash=config_hash(self.base.config))
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


def _embedding_parameters(stack: torch.nn.Module) -> list[torch.nn.Parameter]:
    blocks = {id(p) for p in stack.block.parameters()}
    final = stack.final_layer_norm
    finals = {id(p) for p in final.parameters()} if isinstance(final, torch.nn.Module) else set()
    return [p for p in stack.parameters() if id(p) not in blocks and id(p) not in finals]


def _chunks(units, max_tokens: int, extra: int):
    """Consecutive units in batches of at most ``max_tokens`` padded tokens (one unit alone when longer)."""
    cur, width = [], 0
    for u in units:
        w = max(width, u.length + extra)
        if cur and w * (len(cur) + 1) > max_tokens:
            yield cur
            cur, w = [], u.length + extra
        cur.append(u)
        width = w
    if cur:
        yield cur



def apply_finetune(pretrained, bundle_dir: str, entry: dict[str, Any]):
    """The base model of a fine-tuned head bundle with the bundle's backbone applied, in place: the adapter merged
    into the weights (LoRA), or the trained tensors loaded (full). Returns ``pretrained``."""
    from protlm.errors import CheckpointError

    mode, path = entry.get("mode"), os.path.join(bundle_dir, str(entry.get("path", "")))
    if mode == "lora":
        from protlm.evaluate.bundle import config_hash
        from protlm.finetune.lora import load_adapter, merge_lora

        load_adapter(pretrained.model, path, base_config_hash=config_hash(pretrained.config))
        pretrained.model = merge_lora(pretrained.model)
        return pretrained
    if mode != "full":
        raise CheckpointError(f"{bundle_dir}: unknown fine-tuning mode {mode!r} in head.json (lora or full)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read the fine-tuned backbone weights ({err})") from None
    params = dict(pretrained.model.named_parameters())
    for name, value in tensors.items():
        if name not in params or params[name].shape != value.shape:
            have = "absent" if name not in params else "x".join(map(str, params[name].shape))
            raise CheckpointError(f"{path}: tensor {name!r} ({'x'.join(map(str, value.shape))}) does not fit the "
                                  f"base model {pretrained.source} ({have}); the bundle was trained on another model")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return pretrained
