"""The pretraining loop: data -> objectives -> model -> loss -> optimizer, with checkpoints, validation and logs.

One code path for 1 CPU process and N processes under ``torchrun`` (DDP or FSDP2, see :mod:`protlm.distributed`).

The loss of a step is the mean cross-entropy over every target token of the *global* batch (all micro-batches
of all processes). Each process scales its summed token loss by ``world_size / global_tokens`` before
backward, so that the gradient average that DDP and FSDP perform gives exactly that global mean: N processes
then follow the same loss curve as 1 process with the same global batch (the distributed test checks this).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protlm.config import T5Config, preset
from protlm.convert import UnshardedDraws, build_model, load, materialize, save_pretrained
from protlm.data.exclude import Exclusion
from protlm.data.stream import SequenceStream
from protlm.distributed import (DistEnv, all_reduce_sum, barrier, broadcast_object, gradient_sync, init_distributed,
                                parallelize, resolve_strategy)
from protlm.errors import CheckpointError, ConfigError
from protlm.model.t5 import T5
from protlm.objectives import IGNORE_INDEX, TASKS, PretrainBatches, TaskMixer, collate, fixed_examples
from protlm.precision import Precision, choose
from protlm.tokenizer.vocab import Tokenizer, protlm_tokenizer
from protlm.train.checkpoint import (latest_checkpoint, load_checkpoint, read_meta, remove_partial,
                                     save_checkpoint)
from protlm.train.config import TrainConfig
from protlm.train.metrics import (SLOTS, MetricsLog, Throughput, format_flops, peak_flops, residue_baselines,
                                  step_flops, summarise, token_stats)
from protlm.train.optim import build_optimizer, lr_at, set_lr
from protlm.utils import atomic_write_text

# Pseudo-count weight of the unigram frequencies in the per-protein composition baseline. On 256 validation
# proteins cropped to 128 residues with 20% masked, 100-200 gave the lowest loss (2.895 and 2.894 nats against
# 2.917 for the unigram; 20 gave 2.931, i.e. worse than the unigram); fixed here, not fitted per run.
COMPOSITION_PRIOR = 100.0


@dataclass
class TrainResult:
    step: int  # the last completed optimizer step
    output_dir: str
    final_dir: str | None  # the Hugging Face export, when written
    last_metrics: dict[str, float]
    is_main: bool = True  # rank 0 (the process that wrote the logs and the export)
    tokens_seen: float = 0.0  # encoder + decoder non-padding tokens through the model, over the whole run


def build_model_config(cfg: TrainConfig, tok: Tokenizer) -> T5Config:
    try:
        mcfg = preset(cfg.model.preset, **cfg.model.overrides)
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None
    if mcfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model: vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids")
    return mcfg


class Trainer:
    """Build everything from a :class:`TrainConfig` and run it; see :meth:`run`."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, env: DistEnv | None = None):
        self.cfg = cfg
        self.resume = resume
        self.env = env or init_distributed(cfg.run.device)
        self.out = os.path.abspath(cfg.output_dir)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.accum = cfg.accumulation(self.env.world_size)
        self.strategy = resolve_strategy(cfg.run.parallel, self.env)
        self.precision = self._resolve_precision()
        self._val_spare: dict[str, dict] = {}  # per task, a batch to repeat (uncounted) when this share is empty

    # --- setup ----------------------------------------------------------------------------------------------
    def _resolve_precision(self) -> Precision:
        """run.precision on this device; process 0's measurement decides for all, so every process agrees."""
        p = choose(self.cfg.run.precision, self.env.device, "training", option="run.precision",
                   warn=self._log if self.env.is_main else (lambda msg: None))
        if self.env.distributed:
            p = broadcast_object(p)
        return p

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            from tqdm import tqdm

            tqdm.write(f"protlm pretrain: {msg}", file=sys.stderr)

    def _prepare_output(self) -> Any:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from (or None)."""
        found = latest_checkpoint(self.out)
        if found is not None and not self.resume:
            raise ConfigError(f"{self.out}: holds checkpoints up to step {found.step}; pass --resume to continue "
                              "that run, or choose another output_dir")
        if self.env.is_main:
            os.makedirs(self.out, exist_ok=True)
            remove_partial(self.out)
        barrier()
        if self.resume and found is None:
            self._log(f"no checkpoint in {self.out}; starting from step 0")
        return found

    def _build_tokenizer_and_model(self) -> tuple[Tokenizer, T5, T5Config, Callable[[T5], None] | None]:
        """The vocabulary, the model and its config, and for a fresh model the function that gives it weights.

        A fresh model is built on the meta device: :func:`parallelize` calls :meth:`_init_weights` once the
        model is placed (after sharding with FSDP2), so no process holds more than its part of it.
        """
        cfg = self.cfg
        if cfg.model.init_from:
            pre = load(cfg.model.init_from)
            if pre.model.encoder_only:
                raise ConfigError(f"model.init_from: {cfg.model.init_from} is encoder-only; pretraining needs a decoder")
            if cfg.model.overrides:
                raise ConfigError("model.overrides cannot change the shape of a model loaded with model.init_from")
            return pre.tokenizer, pre.model.train(), pre.config, None
        tok = protlm_tokenizer()
        mcfg = build_model_config(cfg, tok)
        with torch.device("meta"):
            model = T5(mcfg)
        return tok, model.train(), mcfg, self._init_weights

    def _init_weights(self, model: T5) -> None:
        """Storage on this process's device and the seeded initial weights, the same on every process and for
        every sharding: those of ``torch.manual_seed(run.seed); T5(config)`` on the CPU, then the T5X LM head."""
        materialize(model, self.env.device, self.cfg.run.seed)
        mcfg = model.config
        if self.cfg.model.lm_head_init == "t5x" and model.lm_head is not None and not mcfg.tie_word_embeddings:
            with torch.no_grad(), UnshardedDraws(model):
                model.lm_head.weight.normal_(0.0, mcfg.initializer_factor * mcfg.d_model ** -0.5)

    def _stream(self, tok: Tokenizer, paths: list[str], seed: int, **options) -> SequenceStream:
        """Sequences of ``paths`` under the run's length limits and bad-record policy."""
        data = self.cfg.data
        return SequenceStream(paths, tok, max_length=data.max_length, min_length=data.min_length, seed=seed,
                              policy=data.policy, **options)

    def _build_data(self, tok: Tokenizer, mcfg: T5Config) -> tuple[PretrainBatches, dict[str, list[dict]]]:
        """This process's training micro-batches, and its share of the fixed validation batches per task."""
        cfg, env = self.cfg, self.env
        self.exclusion = None
        sequence_files = list(cfg.data.exclude_sequences)
        if cfg.data.exclude_validation:
            sequence_files += [p for p in cfg.data.validation if p not in sequence_files]
        if sequence_files or cfg.data.exclude_ids:
            self.exclusion = Exclusion.from_files(cfg.data.exclude_ids, sequence_files, cfg.data.near_copies())
        stream = self._stream(tok, cfg.data.train, cfg.run.seed, rank=env.rank, world_size=env.world_size,
                              exclude=self.exclusion)
        mixer = TaskMixer(cfg.objective, tok, max_length=cfg.data.max_length)
        batches = PretrainBatches(stream, mixer, batch_size=cfg.run.micro_batch_size, accumulation=self.accum,
                                  seed=cfg.run.seed, decoder_start_id=mcfg.decoder_start_token_id)
        return batches, self._build_validation(tok, mixer, mcfg.decoder_start_token_id)

    def _build_validation(self, tok: Tokenizer, mixer: TaskMixer, start: int) -> dict[str, list[dict]]:
        """Fixed validation batches per task (this process's share), built once for the whole run."""
        cfg, env = self.cfg, self.env
        if not cfg.data.validation or cfg.eval.every == 0:
            return {}
        out = {}
        for task in mixer.tasks:
            stream = self._stream(tok, cfg.data.validation, cfg.eval.seed, shuffle=False, epochs=1)
            examples = fixed_examples(stream, mixer, task, seed=cfg.eval.seed, limit=cfg.data.validation_sequences)
            mine = examples[env.rank::env.world_size]
            # length-sorted batches waste less on padding; the order does not change the sums
            mine.sort(key=lambda e: len(e.input_ids))
            out[task] = [collate(mine[i:i + cfg.eval.batch_size], tok, start)
                         for i in range(0, len(mine), cfg.eval.batch_size)]
            if examples:  # a process whose share is empty still has to join every forward (see _validate)
                self._val_spare[task] = collate(examples[:1], tok, start)
        return out

    def _residue_baselines(self, tok: Tokenizer, val: dict[str, list[dict]]) -> dict[str, float]:
        """Cross-entropy of the validation residue targets under two models that know no sequence order.

        - ``unigram_loss``: the training residue frequencies (from up to ``eval.baseline_sequences`` training
          sequences, add-one smoothed): a model that knows residue composition in general and nothing else;
        - ``composition_loss``: each protein's own composition, counted over the residues its encoder input
          shows and smoothed towards the unigram frequencies with a prior worth ``COMPOSITION_PRIOR`` residues.
          Proteins differ in composition (membrane, disordered, ...), and a model can learn this by pooling its
          input, so this is the first thing a trained model should beat; beating it needs order and context.
        """
        cfg = self.cfg
        if not val:
            return {}
        counts = np.ones(tok.vocab_size, dtype=np.float64)
        stream = self._stream(tok, cfg.data.train, cfg.run.seed, epochs=1, exclude=self.exclusion)
        for i, residues in enumerate(stream):
            counts += np.bincount(residues, minlength=tok.vocab_size)
            if i + 1 >= cfg.eval.baseline_sequences:
                break
        is_res = np.zeros(tok.vocab_size, dtype=bool)
        is_res[tok.residue_id_array] = True
        probs = np.where(is_res, counts, 0.0)
        probs = probs / probs.sum()
        sums = torch.zeros(len(TASKS), 3, dtype=torch.float64)  # unigram nats, composition nats, residues
        for task, batches in val.items():
            for b in batches:
                sums[TASKS.index(task)] += torch.tensor(residue_baselines(
                    b["input_ids"].numpy(), b["labels"].numpy(), is_res, probs, COMPOSITION_PRIOR), dtype=torch.float64)
        all_reduce_sum(sums)
        out = {}
        for i, t in enumerate(TASKS):
            if sums[i, 2] > 0:
                out[f"val/{t}/unigram_loss"] = float(sums[i, 0] / sums[i, 2])
                out[f"val/{t}/composition_loss"] = float(sums[i, 1] / sums[i, 2])
        return out

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        found = self._prepare_output()
        tok, model, mcfg, init = self._build_tokenizer_and_model()
        batches, val = self._build_data(tok, mcfg)
        baseline = self._residue_baselines(tok, val)
        n_params = sum(p.numel() for p in model.parameters())
        net = parallelize(model, self.strategy, env, cfg.run.activation_checkpointing, materialize=init)
        optimizer = build_optimizer(net, cfg.optim, foreach=False if self.strategy == "fsdp" else None)
        step = self._start(found, mcfg, net, optimizer, batches)
        peak = self._announce(mcfg, step, n_params, baseline)
        metrics = MetricsLog(self.out, cfg.log.tensorboard, None if found is None else step) if env.is_main else None

        residue_ids = torch.as_tensor(tok.residue_id_array, device=env.device)
        autocast = self._autocast()
        data = batches.loader(num_workers=cfg.data.workers)
        bar = self._progress(step)
        window = Throughput()
        window.reset()
        window_table = torch.zeros(len(TASKS), len(SLOTS), dtype=torch.float64, device=env.device)
        window_steps = 0
        last: dict[str, float] = {}
        started = time.monotonic()
        try:
            # a run resumed after its token budget was used up has nothing left to train
            while step < cfg.run.steps and not (0 < cfg.run.token_budget <= self._tokens_seen):
                micro = [next(data) for _ in range(self.accum)]
                if micro[0]["step"] != step:  # the data position and the step counter must agree
                    raise CheckpointError(f"data is at step {micro[0]['step']} but training is at step {step}")
                lr = lr_at(step + 1, cfg.optim, cfg.run.steps)
                table, grad_norm = self._train_step(net, optimizer, micro, lr, mcfg, residue_ids, autocast, window)
                step += 1
                window_table += table
                window_steps += 1
                if bar is not None:
                    bar.update(1)

                final = step == cfg.run.steps or self._out_of_time(started) or self._budget_reached()
                if step % cfg.log.every == 0 or final:
                    last = self._report(step, window, window_table, window_steps, lr, grad_norm, peak, metrics, bar)
                    window.reset()
                    window_table.zero_()
                    window_steps = 0
                if val and (step % cfg.eval.every == 0 or final):
                    last.update(self._validate(step, net, val, baseline, residue_ids, autocast, metrics))
                    window.reset()  # validation time is not training throughput
                if step % cfg.checkpoint.every == 0 or final:
                    self._save(step, net, optimizer, batches, mcfg)
                    window.reset()
                if final:
                    break
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()

        final_dir = self._export(net, mcfg, tok) if cfg.checkpoint.export else None
        return TrainResult(step, self.out, final_dir, last, env.is_main, self._tokens_seen)

    def _start(self, found, mcfg: T5Config, net, optimizer, batches: PretrainBatches) -> int:
        """The step to start from: 0, or the resumed checkpoint's (with model, optimizer, data and RNG restored)."""
        self._tokens_seen = 0.0
        if found is not None:
            return self._resume_from(found.path, mcfg, net, optimizer, batches)
        # Dropout draws differ between processes (each sees different data); restored exactly on resume.
        torch.manual_seed(self.cfg.run.seed + 1 + self.env.rank)
        return 0

    def _announce(self, mcfg: T5Config, step: int, n_params: int, baseline: dict[str, float]) -> float:
        """Write the resolved config files and log what runs where; returns the peak FLOP/s for MFU."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            atomic_write_text(os.path.join(self.out, "config.yaml"), cfg.to_yaml())
            atomic_write_text(os.path.join(self.out, "model_config.json"), json.dumps(mcfg.to_hf_dict(), indent=1) + "\n")
        peak, peak_source = peak_flops(env.device, self.precision.name, cfg.log.peak_tflops)
        self._log(self.precision.describe())
        self._log(f"{n_params / 1e6:.2f}M parameters, {self.strategy} on {env.world_size} process(es) "
                  f"({env.device.type}), global batch {cfg.run.batch_size} = {cfg.run.micro_batch_size} x "
                  f"{self.accum} accumulation x {env.world_size}; steps {step}->{cfg.run.steps}; "
                  f"MFU peak {format_flops(peak)} in {self.precision.name} ({peak_source})")
        if baseline:
            self._log("baselines on validation residues (unigram / the protein's own composition): "
                      + ", ".join(f"{t} {baseline[f'val/{t}/unigram_loss']:.4f} / "
                                  f"{baseline[f'val/{t}/composition_loss']:.4f}"
                                  for t in TASKS if f"val/{t}/unigram_loss" in baseline))
        return peak

    # --- pieces of a step -----------------------------------------------------------------------------------
    def _train_step(self, net, optimizer, micro: list[dict], lr: float, mcfg: T5Config, residue_ids, autocast,
                    window: Throughput) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this process's micro-batches; returns the per-task sums (see ``SLOTS``) and
        the gradient norm, and adds the step's tokens and FLOPs to ``window``."""
        env = self.env
        # [target tokens, tokens through the model (encoder + decoder inputs, no padding)], all processes
        counts = torch.tensor([[float((b["labels"] != IGNORE_INDEX).sum()),
                                float(b["attention_mask"].sum() + b["decoder_attention_mask"].sum())]
                               for b in micro], dtype=torch.float64).sum(0).to(env.device)
        all_reduce_sum(counts)
        global_tokens = float(counts[0])
        self._tokens_seen += float(counts[1])
        set_lr(optimizer, lr)
        table = torch.zeros(len(TASKS), len(SLOTS), dtype=torch.float64, device=env.device)
        for i, b in enumerate(micro):
            b = {k: (v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
            with gradient_sync(net, i == self.accum - 1):
                with autocast:
                    out = self._forward(net, b)
                loss_sum, t = token_stats(out.logits, b["labels"], b["task"], residue_ids)
                (loss_sum * (env.world_size / global_tokens)).backward()
            table += t
            window.tokens += float(b["attention_mask"].sum())
            window.target_tokens += float(t[:, 1].sum())
            window.flops += step_flops(mcfg, b["attention_mask"].sum(1).cpu(), b["decoder_attention_mask"].sum(1).cpu())
        grad_norm = self._clip(net, self.cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return table, grad_norm

    @staticmethod
    def _forward(net, b: dict):
        return net(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   decoder_input_ids=b["decoder_input_ids"], decoder_mask=b["decoder_attention_mask"])

    def _out_of_time(self, started: float) -> bool:
        """Whether run.time_limit_minutes has passed (rank 0's clock decides, so all processes stop together)."""
        limit = self.cfg.run.time_limit_minutes
        if limit <= 0:
            return False
        flag = torch.tensor([float(time.monotonic() - started > 60.0 * limit) if self.env.is_main else 0.0],
                            device=self.env.device)
        stop = bool(all_reduce_sum(flag).item())
        if stop:
            self._log(f"time limit of {limit:g} minutes reached; finishing")
        return stop

    def _budget_reached(self) -> bool:
        """Whether run.token_budget is used up (the count is all-reduced, so every process agrees)."""
        budget = self.cfg.run.token_budget
        if budget <= 0 or self._tokens_seen < budget:
            return False
        self._log(f"token budget of {budget:.4g} reached ({self._tokens_seen:.4g} tokens); finishing")
        return True

    def _autocast(self):
        if self.precision.half:
            return torch.autocast(self.env.device.type, dtype=self.precision.dtype)
        return contextlib.nullcontext()

    @staticmethod
    def _clip(net: torch.nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in net.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return norm

    def _report(self, step, window, table, n_steps, lr, grad_norm, peak, metrics, bar) -> dict[str, float]:
        env = self.env
        all_reduce_sum(table)
        totals = torch.tensor([window.tokens, window.target_tokens, window.flops], dtype=torch.float64,
                              device=env.device)
        all_reduce_sum(totals)
        seconds = max(time.perf_counter() - window.start, 1e-9)
        values = summarise(table, "train")
        values.update({
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_s": float(totals[0]) / seconds,
            "train/target_tokens_per_s": float(totals[1]) / seconds,
            "train/mfu": float(totals[2]) / seconds / (peak * env.world_size) if peak > 0 else math.nan,
            "train/steps_in_window": n_steps,
            "train/tokens_seen": self._tokens_seen,
        })
        if metrics is not None:
            metrics.write(step, values)
        if bar is not None:
            bar.set_postfix(loss=f"{values.get('train/all/loss', math.nan):.4f}",
                            tok_s=f"{values['train/tokens_per_s']:.0f}", refresh=False)
        return values

    def _validate(self, step, net, val, baseline, residue_ids, autocast, metrics) -> dict[str, float]:
        """Validation loss per task (with the baselines), logged and written to the metrics."""
        v = self._validation_sums(net, val, residue_ids, autocast)
        v.update(baseline)
        if metrics is not None:
            metrics.write(step, v)
            self._plot()
        self._log(f"step {step} validation: " + ", ".join(
            f"{t} {v[f'val/{t}/loss']:.4f} (residues {v.get(f'val/{t}/residue_loss', math.nan):.4f}"
            f" vs unigram {v.get(f'val/{t}/unigram_loss', math.nan):.4f},"
            f" composition {v.get(f'val/{t}/composition_loss', math.nan):.4f})"
            for t in TASKS if f"val/{t}/loss" in v))
        return v

    @torch.no_grad()
    def _validation_sums(self, net, val, residue_ids, autocast) -> dict[str, float]:
        net.eval()
        table = torch.zeros(len(TASKS), len(SLOTS), dtype=torch.float64, device=self.env.device)
        # Every process must run the same number of forwards (FSDP gathers parameters in each), so a process
        # with fewer batches repeats its last one without counting it.
        for task in val:
            counts = torch.tensor([float(len(val[task]))], device=self.env.device)
            if self.env.distributed:
                torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            batches = val[task]
            for i in range(int(counts.item())):
                b = batches[i] if i < len(batches) else batches[-1] if batches else self._val_spare[task]
                b = {k: (v.to(self.env.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                with autocast:
                    out = self._forward(net, b)
                _, t = token_stats(out.logits, b["labels"], b["task"], residue_ids)
                if i < len(batches):  # padding forwards (to keep processes in step) do not count
                    table += t
        all_reduce_sum(table)
        net.train()
        return summarise(table, "val")

    def _plot(self) -> None:
        from protlm.train.plot import plot_curves

        try:
            plot_curves(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"),
                        title=f"{os.path.basename(self.out)}: preset {self.cfg.model.preset}"
                              + (" with overrides" if self.cfg.model.overrides else ""))
        except (OSError, ValueError) as err:  # a plot is a convenience; never stop training for it
            self._log(f"could not draw curves.png ({err})")

    def _progress(self, step: int):
        if not (self.env.is_main and self.cfg.log.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.run.steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
                    file=sys.stderr)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _meta(self, mcfg: T5Config) -> dict[str, Any]:
        return {"model_config": mcfg.to_dict(), "config": self.cfg.to_dict(), "strategy": self.strategy,
                "precision": self.precision.to_dict()}

    def _save(self, step, net, optimizer, batches, mcfg) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            save_checkpoint(self.out, step, net, optimizer, self.env,
                            {"data": batches.state_dict(), "tokens_seen": self._tokens_seen},
                            self._meta(mcfg), keep=self.cfg.checkpoint.keep)

    def _resume_from(self, path, mcfg, net, optimizer, batches) -> int:
        meta = read_meta(path)
        saved_model = meta.get("model_config", {})
        now_model = mcfg.to_dict()
        for key in sorted(set(saved_model) | set(now_model)):
            if saved_model.get(key) != now_model.get(key):
                raise CheckpointError(f"{path}: model config differs from this run: {key} is "
                                      f"{saved_model.get(key)!r} in the checkpoint but {now_model.get(key)!r} now")
        if meta.get("world_size") != self.env.world_size:
            raise CheckpointError(f"{path}: written by {meta.get('world_size')} process(es), resumed with "
                                  f"{self.env.world_size}; the data position is per process, so use the same number")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            saved = load_checkpoint(path, net, optimizer, self.env)
        batches.load_state_dict(saved["data"])
        if "tokens_seen" in saved:
            self._tokens_seen = float(saved["tokens_seen"])
        elif self.cfg.run.token_budget > 0:  # written before the count existed: the budget cannot be honoured
            raise CheckpointError(f"{path}: holds no token count, so run.token_budget cannot be applied on resume")
        self._log(f"resumed from {path} (step {meta['step']})")
        return int(meta["step"])

    def _export(self, net, mcfg: T5Config, tok: Tokenizer) -> str | None:
        """The final weights in the Hugging Face layout (``protlm.load`` and ``transformers`` both read it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = os.path.join(self.out, "final")
        if self.env.is_main:
            save_pretrained(build_model(mcfg, state=state, source="export"), final, tok)
            self._log(f"final model written to {final}")
        barrier()
        return final
