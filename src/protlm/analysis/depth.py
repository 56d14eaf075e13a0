"""Which layers of a protein language model do the work: the measurements behind ``protlm analyze depth``.

The measures follow the probing- and perturbation-based analyses of "From Words to Amino Acids: Does the Curse
of Depth Persist?" (Siji et al., 2026; seeds/002) and of the LLM studies it extends:

1. contribution: per block, ||attention update|| / ||h||, ||cross-attention update|| / ||h|| (decoder),
   ||FFN update|| / ||h|| and ||h_out - h_in|| / ||h_in||, and the cosine of each update with the stream it is
   added to (h is the stream the sublayer reads);
2. skip: remove one block (its output := its input); relative change ||h'_m - h_m|| / ||h_m|| of every later
   stream m, and the change of the output distribution at the masked residues (KL(full || skipped) and top-1
   agreement); it reruns the stack once per block (N^2/2 block runs per protein), so it runs on a seeded sample
   of the proteins (``skip_proteins``, default 64) and every other analysis on all of them;
3. early exit: the encoder stream after block l, through the final norm, fed to the decoder (KL and top-1
   agreement to the full model); for the decoder, the final norm and LM head on each decoder stream (logit lens);
4. probe: a linear probe per encoder layer on a residue task (``probe.py``);
5. similarity: linear CKA between every pair of layers.

What "the output" is depends on ``model.kind`` (:mod:`protlm.model.protocol`), never on the family name:

- encoder-decoder (T5): the decoder's predictions, teacher-forced on 1-gram denoising targets (masked residues
  are sentinels in the encoder input);
- masked-LM (ESM-2, DPLM): ``mlm_logits(final_layer_norm(h_N))`` at the positions shown as ``<mask>``; its early
  exit is the logit lens of the encoder: ``mlm_logits(final_layer_norm(h_l))``;
- causal-LM (GPT-2, ProtGPT2): next-token prediction ``log_softmax(lm_logits(ln_f(h_N)))`` at every position
  that has a next token, on the clean protein in the model's text convention (nothing is masked); its early exit
  is the logit lens through ``ln_f`` and the tied head. Its single causal stack is analysed as "the encoder";
- an encoder without a head (``encoder_only``): no output measures; everything runs on the clean input.

Representations for probes and CKA are final_layer_norm(h_l): what a model truncated after block l outputs.
A masked LM's CKA and probes read the clean input ``<cls> residues <eos>`` (as ``protlm embed`` feeds it), not
the masked one its output measures need. A causal LM's tokens span several residues: its CKA is over tokens
(those holding a residue) and its probes over residues, each residue given the vector of the token holding it
(as ``protlm embed`` does).
Everything runs block by block through :class:`~protlm.analysis.blocks.StackRunner` under inference mode, one
token-budget batch at a time, so memory stays bounded by the batch, never by the number of proteins.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from protlm.analysis.inputs import DepthBatch, batches, prepare_proteins, read_proteins
from protlm.analysis.metrics import (OutputComparison, OutputReference, PerProtein, Summary, linear_cka_matrix,
                                     row_mean, update_stats)
from protlm.analysis.probe import LayerProbes, ProbeTask, load_probe_task
from protlm.analysis.blocks import StackMasks, StackRunner
from protlm.embedding.run import PREFIX_BY_FAMILY
from protlm.errors import ConfigError

ANALYSES = ("contribution", "skip", "early-exit", "cka", "probe")


@dataclass
class DepthOptions:
    """Settings of a depth analysis (each is a flag of ``protlm analyze depth``)."""

    analyses: tuple[str, ...] | None = None  # subset of ANALYSES; None = every one the model supports
    decoder: bool | None = None  # also analyse the decoder's layers; None = when the model has a decoder
    encoder_layers: list[int] | None = None  # layers (0..N) for skip/early-exit/CKA/probes; None = all
    decoder_layers: list[int] | None = None  # same for the decoder (0..M)
    max_length: int = 512  # residues per protein; longer ones are cropped to a seeded random window
    mask_rate: float = 0.15  # share of residues masked for the output measures (denoising or masked-LM input)
    seed: int = 0  # masking, cropping, token sampling and probe subsets
    batch_tokens: int = 4096  # padded encoder tokens per batch
    cka_tokens: int = 8192  # tokens (sampled evenly over proteins) per CKA matrix
    probe_task: str | None = "ssp3"  # None = no probes
    probe_data: str | None = None  # folder with the probe task's files (default: $PROTLM_DATA/ssp_netsurfp)
    probe_train: int = 200  # training proteins for the probes
    probe_test: int = 100  # test proteins for the probes
    skip_proteins: int | None = 64  # proteins the skip analysis runs on (a seeded sample); None = every one
    flip_threshold: float = 0.05  # summary: a layer "barely changes the output" below this top-1 flip rate

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["analyses"] = list(self.analyses) if self.analyses is not None else None
        return d


@dataclass
class DepthPlan:
    """What will be computed, resolved against the model (errors for impossible requests are raised here)."""

    analyses: tuple[str, ...]
    has_decoder: bool  # the model has a decoder
    decoder: bool  # the decoder's own layers are analysed
    encoder_layers: list[int]
    decoder_layers: list[int]
    output: str | None = None  # what the output measures read: "decoder", "lm-head" (masked LM), "next-token"
    #                            (causal LM) or None
    causal_lm: bool = False  # the model is a causal LM (clean input, BPE tokens), with or without its head

    @property
    def masked_lm(self) -> bool:
        return self.output == "lm-head"

    @property
    def head_on_stack(self) -> bool:
        """The output is an LM head read off the analysed stack's own positions (masked or causal LM)."""
        return self.output in ("lm-head", "next-token")


OUTPUT_MEANS = {
    "decoder": "the decoder's prediction of each masked residue (teacher-forced on its 1-gram denoising target; "
               "the encoder's final representation is what the decoder reads)",
    "lm-head": "the masked-LM head's prediction at each position shown as <mask>: "
               "mlm_logits(final_layer_norm(h_N)); early exit reads layer l the same way (logit lens)",
    "next-token": "the causal LM's next-token prediction at every position that has a next token: "
                  "log_softmax(lm_head(ln_f(h_N))) with the head tied to the embeddings; early exit reads layer l "
                  "the same way (logit lens)",
}


def output_of(model) -> str | None:
    """What a model's output measures read (see :data:`OUTPUT_MEANS`), from the model protocol."""
    if model.decoder is not None:
        return "decoder"
    if model.kind == "masked-lm" and not model.encoder_only:
        return "lm-head"
    if model.kind == "causal-lm" and not model.encoder_only:
        return "next-token"
    return None


def resolve_plan(model, options: DepthOptions) -> DepthPlan:
    has_decoder = model.decoder is not None
    output = output_of(model)
    if not has_decoder and (options.decoder or options.decoder_layers is not None) and model.kind == "causal-lm":
        raise ConfigError("this model is a causal LM: its one causal stack is analysed as the encoder (there is no "
                          "separate decoder); drop --decoder / --decoder-layers")
    if not has_decoder and (options.decoder or options.decoder_layers is not None) and model.kind == "masked-lm":
        raise ConfigError("this model is a masked LM: it has no decoder (its output is the LM head on the "
                          "encoder's own positions); drop --decoder / --decoder-layers")
    if options.decoder and not has_decoder:
        raise ConfigError("this model is encoder-only; decoder analyses need an encoder-decoder checkpoint")
    analyse_decoder = has_decoder if options.decoder is None else options.decoder
    if options.analyses is None:
        analyses = [a for a in ANALYSES if (a != "early-exit" or output) and (a != "probe" or options.probe_task)]
    else:
        analyses = list(dict.fromkeys(options.analyses))
        for a in analyses:
            if a not in ANALYSES:
                raise ConfigError(f"unknown analysis {a!r}; choose from {', '.join(ANALYSES)}")
        if "early-exit" in analyses and not output:
            if model.kind in ("masked-lm", "causal-lm"):
                raise ConfigError("early-exit needs the LM head (the encoder's layers are read through it); this "
                                  "model was loaded without it (encoder-only)")
            raise ConfigError("early-exit needs a decoder (the encoder's layers are read through it); this model is encoder-only")
        if "probe" in analyses and not options.probe_task:
            raise ConfigError("the probe analysis needs a task (--task ssp3)")
    enc_layers = (model.encoder.resolve_layers(options.encoder_layers) if options.encoder_layers is not None
                  else list(range(model.encoder.n_layers + 1)))
    if options.decoder_layers is not None and not has_decoder:
        raise ConfigError("--decoder-layers given, but this model is encoder-only (it has no decoder)")
    if options.decoder_layers is not None and not analyse_decoder:
        raise ConfigError("--decoder-layers given together with --no-decoder")
    dec_layers = []
    if analyse_decoder:
        dec_layers = (model.decoder.resolve_layers(options.decoder_layers) if options.decoder_layers is not None
                      else list(range(model.decoder.n_layers + 1)))
    if not 0 < options.flip_threshold < 1:
        raise ConfigError(f"flip threshold must be in (0, 1), got {options.flip_threshold}")
    if options.skip_proteins is not None and options.skip_proteins < 1:
        raise ConfigError(f"--skip-proteins must be at least 1 (or 'all'), got {options.skip_proteins}")
    if options.cka_tokens < 2:
        raise ConfigError(f"--cka-tokens must be at least 2, got {options.cka_tokens}")
    limit = model.max_residues
    if limit is not None and options.max_length > limit:
        raise ConfigError(f"--max-length {options.max_length} is longer than the {limit} residues this model was "
                          f"trained on; use --max-length {limit} or less")
    return DepthPlan(tuple(analyses), has_decoder, analyse_decoder, enc_layers, dec_layers, output,
                     model.kind == "causal-lm")


# --- result records ------------------------------------------------------------------------------------------
@dataclass
class Series:
    """One measure per layer: mean and std over proteins (NaN where undefined)."""

    mean: list[float]
    std: list[float]

    @classmethod
    def of(cls, summaries: list[Summary]) -> "Series":
        return cls([s.mean for s in summaries], [s.std for s in summaries])


@dataclass
class Contribution:
    layers: list[int]  # blocks 1..N
    attn_rel: Series
    ffn_rel: Series
    layer_rel: Series
    attn_cos: Series
    ffn_cos: Series
    layer_cos: Series
    cross_rel: Series | None = None  # decoder only
    cross_cos: Series | None = None


@dataclass
class SkipEffect:
    skipped: list[int]  # rows: the removed block
    later_layers: list[int]  # columns: streams 1..N
    hidden_change: list[list[float]]  # [row][col] mean relative change; NaN for a stream before the skipped block
    hidden_change_std: list[list[float]]
    output_kl: Series | None = None  # None for an encoder-only model
    output_top1_agreement: Series | None = None
    n_proteins: int = 0  # proteins the means are over (a seeded sample of the input: --skip-proteins)


@dataclass
class EarlyExit:
    layers: list[int]
    kl: Series  # KL(full || exit at l), nats per predicted residue
    top1_agreement: Series
    accuracy: Series  # top-1 accuracy on the true masked residues


@dataclass
class Similarity:
    layers: list[int]
    cka: list[list[float]]
    n_tokens: int


@dataclass
class ProbeResult:
    task: str
    source: str
    layers: list[int]
    score: list[float]  # Q3: per-residue accuracy on the test residues
    alpha: list[float]
    best_layer: int
    best_score: float
    layer_95: int  # first layer reaching 95% of the best score
    majority_baseline: float
    n_train_proteins: int
    n_test_proteins: int
    n_test_residues: int


@dataclass
class StackReport:
    stack: str  # "encoder" or "decoder"
    n_layers: int
    tokens: str  # which positions the per-token measures average over
    contribution: Contribution | None = None
    skip: SkipEffect | None = None
    early_exit: EarlyExit | None = None
    similarity: Similarity | None = None
    probe: ProbeResult | None = None


@dataclass
class DepthReport:
    model: dict
    inputs: dict
    options: dict
    full_model: dict  # denoising accuracy / NLL of the unperturbed model (None for encoder-only)
    encoder: StackReport
    decoder: StackReport | None
    timing: dict  # seconds per analysis
    summary: str = ""
    truncated: dict | None = None

    def to_json_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


# --- the per-batch work --------------------------------------------------------------------------------------
def _at(where: Tensor, values: Tensor) -> Tensor:
    """(B, L) zeros with ``values`` (n,) at the n True positions of ``where`` (row-major, as ``x[where]`` reads)."""
    return torch.zeros(where.shape, dtype=values.dtype, device=values.device).masked_scatter(where, values)


@dataclass
class _Baseline:
    """One batch's unperturbed run, shared by every perturbation of it."""

    enc_masks: StackMasks
    enc: list[Tensor] = field(default_factory=list)  # encoder streams h[0..N] (before the final norm)
    enc_out: Tensor | None = None  # final_layer_norm(h[N]): what the decoder attends to
    dec_masks: StackMasks | None = None
    dec: list[Tensor] = field(default_factory=list)  # decoder streams d[0..M]
    ref: OutputReference | None = None  # the full model's output at the batch's n predicting positions


class _Analyser:
    """Runs the analyses batch by batch and keeps the per-protein numbers; ``stack_report`` summarises them."""

    def __init__(self, model, plan: DepthPlan, options: DepthOptions, n_proteins: int, cka_rates: dict[str, float]):
        self.model = model
        self.plan = plan
        self.opt = options
        self.enc = StackRunner(model.encoder)
        self.dec = StackRunner(model.decoder) if plan.has_decoder else None
        self.acc = PerProtein(n_proteins)
        self.cka_rates = cka_rates
        self.cka: dict[str, dict[int, list[Tensor]]] = {"encoder": defaultdict(list), "decoder": defaultdict(list)}
        self.seconds: dict[str, float] = defaultdict(float)
        self.vocab = int(getattr(model.config, "vocab_size", 0) or 1024)  # sizes the LM head's row chunks
        self.skip_proteins = np.arange(n_proteins)  # the proteins the skip analysis runs on

    def want(self, analysis: str) -> bool:
        return analysis in self.plan.analyses

    # contributions of one block, from its sublayer updates
    def _contribution(self, stack: str, layer: int, h_in: Tensor, out, tokens: Tensor, idx: np.ndarray) -> None:
        def put(name: str, update: Tensor, stream: Tensor) -> None:
            rel, cos = update_stats(update, stream)
            self.acc.put((stack, f"{name}_rel", layer), idx, row_mean(rel, tokens))
            self.acc.put((stack, f"{name}_cos", layer), idx, row_mean(cos, tokens))

        # each update is measured against the stream its sublayer reads (and adds to)
        put("attn", out.attn_update, h_in)
        if out.cross_update is not None:
            put("cross", out.cross_update, h_in + out.attn_update)
        put("ffn", out.ffn_update, out.hidden - out.ffn_update)
        put("layer", out.hidden - h_in, h_in)

    def _forward(self, runner: StackRunner, stack: str, h: Tensor, masks: StackMasks, tokens: Tensor,
                 idx: np.ndarray, record: bool = True, enc: Tensor | None = None) -> list[Tensor]:
        """All streams h[0..N] of an unperturbed run, recording contributions when asked."""
        streams = [h]
        record = record and self.want("contribution") and (stack == "encoder" or self.plan.decoder)
        for layer in range(1, runner.n_layers + 1):
            out = runner.block(layer, streams[-1], masks, enc, updates=record)
            if record:
                self._contribution(stack, layer, streams[-1], out, tokens, idx)
            streams.append(out.hidden)
        return streams

    def _logits_of(self, stream: Tensor):
        """``rows -> logits`` of the LM head reading ``stream`` (n, D): the pre-norm stream at the n predicting
        positions (the decoder's for T5, the analysed stack's own for a masked or causal LM), through the final
        norm and the head, a slice of rows at a time."""
        if self.plan.has_decoder:
            norm, head = self.dec.normed, self.model.lm_logits
        else:
            norm, head = self.enc.normed, self.model.mlm_logits if self.plan.masked_lm else self.model.lm_logits
        return lambda rows: head(norm(stream[rows]))

    def _output_stream(self, enc_last: Tensor, b: DepthBatch, base: "_Baseline") -> Tensor:
        """What the LM head reads (n, D) when the encoder's last stream (before the final norm) is ``enc_last``:
        that stream itself at the predicting positions (masked or causal LM), or the decoder's last stream run on
        it (T5)."""
        if self.plan.head_on_stack:
            return enc_last[b.pred_mask]
        h = self.dec.embed(b.decoder_input_ids)
        return self.dec.run(h, base.dec_masks, 0, enc=self.enc.normed(enc_last))[-1][b.pred_mask]

    def _compare(self, stream: Tensor, base: "_Baseline") -> OutputComparison:
        return base.ref.compare(self._logits_of(stream), stream.shape[0])

    def _record_output(self, key: tuple, cmp: OutputComparison, b: DepthBatch, accuracy: bool = False) -> None:
        values = [("kl", cmp.kl), ("top1", cmp.top1_agree)] + ([("acc", cmp.correct)] if accuracy else [])
        for name, v in values:  # values at the predicting positions, put back in their rows
            self.acc.put(key + (name,), b.index, row_mean(_at(b.pred_mask, v), b.pred_mask))

    def _hidden_change(self, stack: str, skipped: int, perturbed: list[Tensor], base: list[Tensor],
                       base_norms: list[Tensor], tokens: Tensor, idx: np.ndarray) -> None:
        # perturbed[i] is the stream after block skipped + i; base_norms[m] = ||h_m|| per token (B, L)
        for i, h in enumerate(perturbed):
            m = skipped + i
            diff = torch.linalg.vector_norm((h - base[m]).float(), dim=-1)
            self.acc.put((stack, "skip_hidden", skipped, m), idx, row_mean(diff / base_norms[m].clamp(min=1e-12), tokens))

    def _sample_cka(self, stack: str, streams: list[Tensor], layers: list[int], tokens: Tensor, b: DepthBatch,
                    runner: StackRunner) -> None:
        rate = self.cka_rates[stack]
        rows, cols = [], []
        tok_cpu = tokens.cpu()
        for r, p in enumerate(b.index):
            pos = torch.nonzero(tok_cpu[r]).flatten()
            draw = np.random.default_rng([self.opt.seed, int(p), 17 if stack == "encoder" else 23]).random(len(pos))
            keep = pos[torch.from_numpy(draw < rate)]
            rows.append(torch.full_like(keep, r))
            cols.append(keep)
        rows_t, cols_t = torch.cat(rows).to(tokens.device), torch.cat(cols).to(tokens.device)
        if rows_t.numel() == 0:
            return
        for layer in layers:
            self.cka[stack][layer].append(runner.normed(streams[layer][rows_t, cols_t]).float().cpu())

    def batch(self, b: DepthBatch, skip: bool = True) -> None:
        """Every analysis of one batch (the skip analysis too unless ``skip`` is False); per-protein results go
        into ``self.acc``."""
        t = time.perf_counter()
        base = self._baseline(b)
        self.seconds["forward+contribution"] += time.perf_counter() - t
        for name, step in (("cka", self._cka_step), ("skip", self._skip_step), ("early-exit", self._exit_step)):
            if self.want(name) and (skip or name != "skip"):
                t = time.perf_counter()
                step(b, base)
                self.seconds[name] += time.perf_counter() - t

    def skip_batch(self, b: DepthBatch) -> None:
        """The skip analysis alone, for a batch of the proteins sampled for it (``--skip-proteins``)."""
        t = time.perf_counter()
        self._skip_step(b, self._baseline(b, record=False))
        self.seconds["skip"] += time.perf_counter() - t

    def _baseline(self, b: DepthBatch, record: bool = True) -> "_Baseline":
        """The unperturbed run: every encoder (and decoder) stream, and the full model's output. ``record`` puts
        the contributions and the full model's accuracy into ``self.acc`` (once per protein)."""
        idx = b.index
        h0 = self.enc.embed(b.input_ids, b.attention_mask)
        base = _Baseline(self.enc.masks(h0, b.attention_mask))
        base.enc = self._forward(self.enc, "encoder", h0, base.enc_masks, b.enc_tokens, idx, record)
        if self.plan.has_decoder:
            base.enc_out = self.enc.normed(base.enc[-1])
            d0 = self.dec.embed(b.decoder_input_ids)
            base.dec_masks = self.dec.masks(d0, None, b.attention_mask)
            base.dec = self._forward(self.dec, "decoder", d0, base.dec_masks, b.pred_mask, idx, record,
                                     enc=base.enc_out)
        if self.plan.output:
            stream = (base.dec if self.plan.has_decoder else base.enc)[-1][b.pred_mask]
            base.ref = OutputReference(self._logits_of(stream), stream.shape[0], self.vocab, b.labels[b.pred_mask])
        if self.plan.output and record:
            self.acc.put(("output", "acc"), idx, row_mean(_at(b.pred_mask, base.ref.correct), b.pred_mask))
            self.acc.put(("output", "nll"), idx, row_mean(_at(b.pred_mask, base.ref.nll), b.pred_mask))
        return base

    def _cka_step(self, b: DepthBatch, base: "_Baseline") -> None:
        if self.plan.masked_lm:
            # a masked LM's representations are read on the clean input, every residue (as protlm embed feeds it)
            clean = b.clean_input_ids()
            h = self.enc.embed(clean, b.attention_mask)
            streams = [h] + self.enc.run(h, self.enc.masks(h, b.attention_mask), 0)
            self._sample_cka("encoder", streams, self.plan.encoder_layers, b.enc_tokens | b.pred_mask, b, self.enc)
            return
        self._sample_cka("encoder", base.enc, self.plan.encoder_layers, b.enc_tokens, b, self.enc)
        if self.plan.decoder:
            self._sample_cka("decoder", base.dec, self.plan.decoder_layers, b.pred_mask, b, self.dec)

    def _skip_step(self, b: DepthBatch, base: "_Baseline") -> None:
        norms = [torch.linalg.vector_norm(h.float(), dim=-1) for h in base.enc]
        for layer in (l for l in self.plan.encoder_layers if l >= 1):
            later = self.enc.run(base.enc[layer - 1], base.enc_masks, layer - 1, skip=layer)
            self._hidden_change("encoder", layer, later, base.enc, norms, b.enc_tokens, b.index)
            if self.plan.output:
                cmp = self._compare(self._output_stream(later[-1], b, base), base)
                self._record_output(("encoder", "skip_out", layer), cmp, b)
        if self.plan.decoder:
            norms = [torch.linalg.vector_norm(d.float(), dim=-1) for d in base.dec]
            for layer in (l for l in self.plan.decoder_layers if l >= 1):
                later = self.dec.run(base.dec[layer - 1], base.dec_masks, layer - 1, enc=base.enc_out, skip=layer)
                self._hidden_change("decoder", layer, later, base.dec, norms, b.pred_mask, b.index)
                self._record_output(("decoder", "skip_out", layer), self._compare(later[-1][b.pred_mask], base), b)

    def _exit_step(self, b: DepthBatch, base: "_Baseline") -> None:
        n_enc = self.enc.n_layers
        for layer in self.plan.encoder_layers:
            # exiting after the last block is the full model itself (a masked/causal LM's head is cheap at its
            # positions, so it is re-read there: the logit lens path is then checked against the output path)
            if layer == n_enc and not self.plan.head_on_stack:
                cmp = base.ref.itself()
            else:
                cmp = self._compare(self._output_stream(base.enc[layer], b, base), base)
            self._record_output(("encoder", "exit", layer), cmp, b, accuracy=True)
        if self.plan.decoder:
            for layer in self.plan.decoder_layers:
                self._record_output(("decoder", "exit", layer), self._compare(base.dec[layer][b.pred_mask], base), b,
                                    accuracy=True)

    # --- assembling the report ---------------------------------------------------------------------------
    def _series(self, *key_prefix, layers) -> Series:
        return Series.of([self.acc.summary(key_prefix + (l,)) for l in layers])

    def stack_report(self, stack: str) -> StackReport:
        runner = self.enc if stack == "encoder" else self.dec
        n = runner.n_layers
        layers = self.plan.encoder_layers if stack == "encoder" else self.plan.decoder_layers
        tokens = ("unmasked residue positions of the encoder input" if stack == "encoder"
                  else "decoder positions that predict a masked residue")
        if stack == "encoder" and self.plan.masked_lm:
            tokens = ("unmasked residue positions of the masked input (output measures: the masked positions; CKA: "
                      "every residue of the clean input)")
        if stack == "encoder" and self.plan.causal_lm:
            tokens = ("tokens of the clean input that hold a residue (a BPE token spans several; output measures: "
                      "every position that has a next token; CKA: the residue-holding tokens)")
        rep = StackReport(stack, n, tokens)
        blocks = list(range(1, n + 1))
        if self.want("contribution"):
            s = lambda name: self._series(stack, name, layers=blocks)  # noqa: E731
            cross = stack == "decoder"
            rep.contribution = Contribution(blocks, s("attn_rel"), s("ffn_rel"), s("layer_rel"), s("attn_cos"),
                                            s("ffn_cos"), s("layer_cos"), s("cross_rel") if cross else None,
                                            s("cross_cos") if cross else None)
        if self.want("skip"):
            skipped = [l for l in layers if l >= 1]
            mean = [[self.acc.summary((stack, "skip_hidden", l, m)).mean for m in blocks] for l in skipped]
            std = [[self.acc.summary((stack, "skip_hidden", l, m)).std for m in blocks] for l in skipped]
            rep.skip = SkipEffect(skipped, blocks, mean, std, n_proteins=len(self.skip_proteins))
            if self.plan.output:
                rep.skip.output_kl = Series.of([self.acc.summary((stack, "skip_out", l, "kl")) for l in skipped])
                rep.skip.output_top1_agreement = Series.of([self.acc.summary((stack, "skip_out", l, "top1")) for l in skipped])
        if self.want("early-exit"):
            rep.early_exit = EarlyExit(
                list(layers),
                Series.of([self.acc.summary((stack, "exit", l, "kl")) for l in layers]),
                Series.of([self.acc.summary((stack, "exit", l, "top1")) for l in layers]),
                Series.of([self.acc.summary((stack, "exit", l, "acc")) for l in layers]),
            )
        if self.want("cka"):
            t = time.perf_counter()
            feats = [torch.cat(self.cka[stack][l]) if self.cka[stack][l] else torch.zeros(0, 1) for l in layers]
            matrix = linear_cka_matrix(feats) if feats and feats[0].shape[0] > 1 else np.full((len(layers),) * 2, np.nan)
            rep.similarity = Similarity(list(layers), matrix.tolist(), int(feats[0].shape[0]) if feats else 0)
            self.seconds["cka"] += time.perf_counter() - t
        return rep


def embedding_prefix(model) -> str | None:
    """The task prefix ``protlm embed`` uses for this model family (Ankh3: [NLU]; others: none)."""
    if model.kind in ("masked-lm", "causal-lm"):
        return None  # no task tokens: <cls> residues <eos> (masked LM), ProtGPT2's text (causal LM)
    prefix = PREFIX_BY_FAMILY.get(model.config.protlm_family, "none")
    return None if prefix == "none" else prefix


# --- probes --------------------------------------------------------------------------------------------------
def run_probes(model, tok, task: ProbeTask, layers: list[int], options: DepthOptions, device,
               progress: bool = False) -> ProbeResult:
    """Fit one linear probe per encoder layer on ``task.train`` and score it on ``task.test`` (clean input)."""
    from tqdm.auto import tqdm

    runner = StackRunner(model.encoder)
    probes = LayerProbes(layers, len(task.classes))

    causal = model.kind == "causal-lm"

    def feed(split, train: bool):
        records = list(zip(split.ids, split.sequences))
        prefix = embedding_prefix(model)
        prots = prepare_proteins(records, tok, options.max_length, None, options.seed, source=f"probe {task.name}",
                                 clean_prefix=prefix, causal_lm=causal)
        n_prefix = len(tok.prefix_token_ids(prefix))
        for b in tqdm(batches(prots, tok, options.batch_tokens, causal_lm=causal),
                      desc=f"probe {'train' if train else 'test'}", disable=not progress, leave=False):
            b = b.to(device)
            # per residue: its label, its row in the batch and the token that holds it (one token per residue,
            # after the prefix, unless the tokenizer's tokens span several: then the residue -> token map)
            ys, rows, cols, prot = [], [], [], []
            for r, p in enumerate(b.index):
                pr = prots[p]
                ys.append(torch.from_numpy(split.labels[p][pr.start:pr.start + pr.length]))
                cols.append(torch.from_numpy(pr.token_of_residue) if causal
                            else torch.arange(n_prefix, n_prefix + pr.length))
                rows.append(torch.full((pr.length,), r))
                prot.append(torch.full((pr.length,), int(p)))
            y, rows_t, cols_t, prot_t = (torch.cat(t) for t in (ys, rows, cols, prot))
            keep = y >= 0
            if not keep.any():
                continue
            y, rows_t, cols_t, prot_t = (t[keep].to(device) for t in (y, rows_t, cols_t, prot_t))
            h = runner.embed(b.input_ids, b.attention_mask)
            masks = runner.masks(h, b.attention_mask)
            streams = [h] + runner.run(h, masks, 0)
            feats = {l: runner.normed(streams[l][rows_t, cols_t]) for l in layers}
            if train:
                probes.add_train(feats, y, prot_t)
            else:
                probes.add_test(feats, y)

    feed(task.train, True)
    probes.fit()
    feed(task.test, False)
    scores = probes.scores()
    best = int(np.argmax(scores))
    layer_95 = next(l for l, s in zip(layers, scores) if s >= 0.95 * scores[best])
    return ProbeResult(task.name, task.source, list(layers), scores, [probes.fits[l].alpha for l in layers],
                       layers[best], scores[best], layer_95, probes.majority_baseline(),
                       len(task.train.ids), len(task.test.ids), probes.total)


# --- entry point ---------------------------------------------------------------------------------------------
# --- resuming -------------------------------------------------------------------------------------------------
class _Checkpoint:
    """Finished batches' per-protein numbers, saved now and then, so an interrupted run continues where it stopped.

    The file is keyed by a fingerprint of the model, the proteins and the options; a different run ignores it.
    """

    EVERY_SECONDS = 300.0  # how often finished batches are written (and always on Ctrl-C)

    def __init__(self, path: str | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.last = time.perf_counter()

    def load(self, analyser: "_Analyser") -> int:
        """Restore a matching saved state into ``analyser``; returns how many batches it had finished."""
        import os

        if not self.path or not os.path.exists(self.path):
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a foreign or damaged file: start over (it is only a cache of finished work)
            return 0
        if state.get("fingerprint") != self.fingerprint:
            return 0
        analyser.acc.values = {k: v.numpy().copy() for k, v in state["values"].items()}
        for stack, layers in state["cka"].items():
            for layer, feats in layers.items():
                analyser.cka[stack][layer] = [feats]
        analyser.seconds.update(state["seconds"])
        return int(state["done"])

    def save(self, analyser: "_Analyser", done: int, force: bool = False) -> None:
        if not self.path or (not force and time.perf_counter() - self.last < self.EVERY_SECONDS):
            return
        import os

        from protlm.utils import atomic_path

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        state = {
            "fingerprint": self.fingerprint, "done": done, "seconds": dict(analyser.seconds),
            "values": {k: torch.from_numpy(v) for k, v in analyser.acc.values.items()},
            "cka": {stack: {layer: torch.cat(f) for layer, f in layers.items() if f}
                    for stack, layers in analyser.cka.items()},
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last = time.perf_counter()


def skip_sample(n_proteins: int, plan: DepthPlan, options: DepthOptions) -> np.ndarray | None:
    """The proteins (sorted input positions) the skip analysis runs on, or None when it runs on every protein
    (or not at all) in the main batches."""
    k = options.skip_proteins
    if "skip" not in plan.analyses or k is None or k >= n_proteins:
        return None
    rng = np.random.default_rng([options.seed, 29])
    return np.sort(rng.choice(n_proteins, size=k, replace=False))


def _fingerprint(pretrained, input_path: str, proteins, options: DepthOptions, plan: DepthPlan) -> str:
    import hashlib
    import json

    key = {"model": pretrained.source, "config": pretrained.model.config.to_dict(),
           "dtype": str(next(pretrained.model.parameters()).dtype), "input": str(input_path),
           "proteins": [p.id for p in proteins], "options": options.to_dict(), "analyses": list(plan.analyses)}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def analyze_depth(pretrained, input_path: str, options: DepthOptions | None = None, max_proteins: int | None = None,
                  progress: bool = False, state_path: str | None = None) -> DepthReport:
    """Run the depth analyses of ``pretrained`` (a :class:`protlm.convert.Pretrained`) over a FASTA/CSV file.

    With ``state_path``, finished batches are saved there every few minutes (and on Ctrl-C), and a re-run with
    the same model, input and options continues from them.
    """
    from tqdm.auto import tqdm

    from protlm.analysis.summary import summary_paragraph

    options = options or DepthOptions()
    model, tok = pretrained.model, pretrained.tokenizer
    plan = resolve_plan(model, options)
    # Bad probe input fails before any model time is spent.
    task = None
    if "probe" in plan.analyses:
        task = load_probe_task(options.probe_task, options.probe_data, options.probe_train, options.probe_test,
                               options.seed)
    records = read_proteins(input_path, max_proteins)
    proteins = prepare_proteins(records, tok, options.max_length, options.mask_rate if plan.output else None,
                                options.seed, source=str(input_path), clean_prefix=embedding_prefix(model),
                                masked_lm=plan.masked_lm, causal_lm=plan.causal_lm)
    device = next(model.parameters()).device
    start_id = model.config.decoder_start_token_id if plan.has_decoder else None
    batch_list = batches(proteins, tok, options.batch_tokens, start_id, masked_lm=plan.masked_lm,
                         causal_lm=plan.causal_lm)
    # The skip analysis reruns the stack once per block: N^2/2 block evaluations per protein against N for the
    # rest. It runs on a seeded sample of the proteins, in batches of its own after the others.
    sample = skip_sample(len(proteins), plan, options)
    work = [(b, sample is None) for b in batch_list]
    if sample is not None:
        work += [(dataclasses.replace(b, index=sample[b.index]), None)
                 for b in batches([proteins[i] for i in sample], tok, options.batch_tokens, start_id,
                                  masked_lm=plan.masked_lm, causal_lm=plan.causal_lm)]
    enc_total = sum(int(b.enc_tokens.sum()) for b in batch_list)
    pred_total = sum(int(b.pred_mask.sum()) for b in batch_list)
    cka_total = enc_total + pred_total if plan.masked_lm else enc_total  # a masked LM's CKA reads every residue
    rates = {"encoder": min(1.0, options.cka_tokens / max(cka_total, 1)),
             "decoder": min(1.0, options.cka_tokens / max(pred_total, 1))}
    was_training = model.training
    model.eval()
    analyser = _Analyser(model, plan, options, len(proteins), rates)
    if sample is not None:
        analyser.skip_proteins = sample
    checkpoint = _Checkpoint(state_path, _fingerprint(pretrained, input_path, proteins, options, plan))
    done = checkpoint.load(analyser)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(work), initial=done, desc="depth analysis", disable=not progress)
            try:
                for i in range(done, len(work)):
                    b, with_skip = work[i]
                    if with_skip is None:  # a batch of the skip sample
                        analyser.skip_batch(b.to(device))
                    else:
                        analyser.batch(b.to(device), skip=with_skip)
                    bar.update(1)
                    checkpoint.save(analyser, i + 1)
            except KeyboardInterrupt:
                checkpoint.save(analyser, i, force=True)
                raise
            finally:
                bar.close()
            encoder = analyser.stack_report("encoder")
            decoder = analyser.stack_report("decoder") if plan.decoder else None
            if task is not None:
                t = time.perf_counter()
                encoder.probe = run_probes(model, tok, task, plan.encoder_layers, options, device, progress)
                analyser.seconds["probe"] += time.perf_counter() - t
    finally:
        model.train(was_training)
    cfg = model.config
    full = {}
    acc, nll = analyser.acc.summary(("output", "acc")), analyser.acc.summary(("output", "nll"))
    if plan.has_decoder:
        full = {"denoising_accuracy": acc.mean, "denoising_nll": nll.mean, "n_predictions": pred_total}
    elif plan.masked_lm:
        full = {"masked_accuracy": acc.mean, "masked_nll": nll.mean, "n_predictions": pred_total}
    elif plan.output == "next-token":
        full = {"next_token_accuracy": acc.mean, "next_token_nll": nll.mean, "n_predictions": pred_total}
    timing = {k: round(v, 3) for k, v in analyser.seconds.items()}
    timing["total"] = round(sum(analyser.seconds.values()), 3)
    timing["wall_this_run"] = round(time.perf_counter() - t0, 3)
    timing["resumed_after_batches"] = done
    report = DepthReport(
        model={"source": pretrained.source, "family": cfg.protlm_family, "d_model": cfg.d_model,
               "encoder_layers": model.encoder.n_layers,
               "decoder_layers": model.decoder.n_layers if model.decoder is not None else 0,
               "kind": model.kind, "output": plan.output, "output_means": OUTPUT_MEANS.get(plan.output),
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "random_init": str(pretrained.source).startswith("random-init")},
        inputs={"path": str(input_path), "n_proteins": len(proteins),
                "n_residues": int(sum(p.length for p in proteins)),
                "n_cropped": int(sum(len(s) > options.max_length for _, s in records)),
                "encoder_tokens_averaged": enc_total, "predicted_residues": pred_total,
                "skip_proteins": int(len(analyser.skip_proteins)) if "skip" in plan.analyses else 0,
                "denoising_input": plan.has_decoder, "masked_lm_input": plan.masked_lm,
                "causal_lm_input": plan.causal_lm,
                "ids": [p.id for p in proteins]},
        options={**options.to_dict(), "analyses": list(plan.analyses), "decoder": plan.decoder,
                 "encoder_layers": plan.encoder_layers, "decoder_layers": plan.decoder_layers},
        full_model=full, encoder=encoder, decoder=decoder, timing=timing,
    )
    report.summary = summary_paragraph(report)
    return report
