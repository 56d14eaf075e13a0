"""Protein completion: the encoder reads ``[S2S]`` + a prefix + ``</s>``, the decoder writes the continuation.

This is Ankh3's sequence-completion task (Ankh3 paper, Section 2.2): trained on 50/50 splits, usable with a
prefix of any length at inference. Output proteins are the prefix followed by the generated residues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from protlm.errors import ConfigError, InputError
from protlm.generation.decoding import Sampling, beam_search, decode, row_generators
from protlm.generation.tokens import (
    DEFAULT_MAX_LENGTH, RESIDUE_SETS, allowed_mask, model_device, require_decoder, task_prefix,
)

STRATEGIES = ("sample", "greedy", "beam")
DEFAULT_MAX_NEW_TOKENS = 512  # Ankh3's training crop length; the model usually ends earlier with </s>


@dataclass
class GenerationConfig:
    """Settings of one generation run; every field is written into the output headers."""

    strategy: str = "sample"  # "sample", "greedy" (argmax) or "beam"
    num_return: int = 1  # sequences per prefix; greedy gives one, beam returns the best num_return beams
    max_new_tokens: int | None = None  # cap on generated residues; default DEFAULT_MAX_NEW_TOKENS
    length_ratio: float | None = None  # instead of max_new_tokens: cap = ceil(ratio * prefix length)
    min_new_tokens: int = 0  # </s> is not allowed before this many residues (a row's cap still wins)
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = off
    top_p: float = 1.0  # sampling only; 1.0 = off
    repetition_penalty: float = 1.0  # causal LMs (sampling or greedy): CTRL's penalty on tokens already present
    num_beams: int = 4  # beam only
    length_penalty: float = 1.0  # beam only: score = log p / length**length_penalty
    seed: int = 0  # sampling only; outputs depend on (seed, input index, sample index), not on batching
    batch_size: int = 16  # decoder rows per batch (beam search: beams count as rows)
    max_length: int = DEFAULT_MAX_LENGTH  # longest prefix or continuation accepted
    residues: str = "standard"  # "standard" (20 residues) or "all" (also X, U, Z, O, B)
    use_cache: bool = True  # False recomputes the whole decoder every step (for checks; much slower)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.residues not in RESIDUE_SETS:
            raise ConfigError(f"residues must be one of {', '.join(RESIDUE_SETS)}, got {self.residues!r}")
        if self.num_return < 1:
            raise ConfigError(f"num_return (--num) must be at least 1, got {self.num_return}")
        if self.max_new_tokens is not None and self.length_ratio is not None:
            raise ConfigError("give max_new_tokens or length_ratio, not both")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ConfigError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.length_ratio is not None and not self.length_ratio > 0:
            raise ConfigError(f"length_ratio must be > 0, got {self.length_ratio}")
        if self.max_new_tokens is not None and self.max_new_tokens > self.max_length:
            raise InputError(f"requested {self.max_new_tokens} new tokens, above the limit of {self.max_length} "
                             "(raise max_length / --max-length to allow it)")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.strategy == "greedy" and self.num_return > 1:
            raise ConfigError(f"greedy decoding gives one sequence per prefix, not {self.num_return}; "
                              "sample or use beam search for several")
        if self.strategy == "beam":
            if self.num_beams < 1:
                raise ConfigError(f"num_beams must be at least 1, got {self.num_beams}")
            if self.num_return > self.num_beams:
                raise ConfigError(f"cannot return {self.num_return} sequences from {self.num_beams} beams")

    def limit_for(self, prefix_length: int) -> int:
        if self.length_ratio is not None:
            return max(1, math.ceil(self.length_ratio * prefix_length))
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    def header(self) -> str:
        """The settings that shaped the output, as ``key=value`` words for a FASTA header."""
        parts = [f"strategy={self.strategy}"]
        parts.append(f"max_new_tokens={self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS}" if self.length_ratio is None
                     else f"length_ratio={self.length_ratio:g}")
        if self.strategy == "sample":
            parts += [f"temperature={self.temperature:g}", f"top_k={self.top_k}", f"top_p={self.top_p:g}",
                      f"seed={self.seed}"]
        if self.strategy == "beam":
            parts += [f"beams={self.num_beams}", f"length_penalty={self.length_penalty:g}"]
        if self.min_new_tokens:
            parts.append(f"min_new_tokens={self.min_new_tokens}")
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty={self.repetition_penalty:g}")
        if self.residues != "standard":
            parts.append(f"residues={self.residues}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    id: str  # the prefix's id
    sample: int  # 0-based index among the num_return outputs of this prefix
    prefix: str
    continuation: str  # generated residues (no </s>)
    log_prob: float  # the model's log p(continuation, </s> if emitted | prefix)
    stop: str  # "eos" or "length"
    score: float | None = None  # beam search ranking score

    @property
    def sequence(self) -> str:
        return self.prefix + self.continuation


def _as_records(prefixes) -> list[tuple[str, str]]:
    if isinstance(prefixes, str):
        return [("prefix", prefixes)]
    if isinstance(prefixes, Mapping):
        return [(str(k), v) for k, v in prefixes.items()]
    out = []
    for i, p in enumerate(prefixes):
        if isinstance(p, str):
            out.append((f"prefix{i + 1}", p))
        elif hasattr(p, "sequence") and hasattr(p, "id"):  # protlm.data.fasta.Record
            out.append((p.id, p.sequence))
        elif isinstance(p, Sequence) and len(p) == 2:
            out.append((str(p[0]), p[1]))
        else:
            raise InputError(f"prefix {i + 1}: expected a string, an (id, sequence) pair or a FASTA record")
    return out


def generate(pre, prefixes, config: GenerationConfig | None = None, first_index: int = 0,
             **overrides) -> list[Completion]:
    """Complete each prefix; returns ``num_return`` completions per prefix, in input order.

    ``pre`` is what :func:`protlm.load` / :func:`protlm.random_init` return. ``prefixes`` is a string, a list
    of strings, a list of (id, sequence) pairs or FASTA records, or a dict id -> sequence. Keyword arguments
    override fields of ``config`` (e.g. ``strategy="greedy"``, ``max_new_tokens=50``).

    The encoder gets ``[S2S]`` when the vocabulary has it (Ankh3) and no prefix otherwise; only models trained
    with the completion task (Ankh3, protlm pretraining) give meaningful continuations. A causal LM (GPT-2,
    ProtGPT2) continues the prefix itself (:mod:`protlm.generation.causal`); there ``max_new_tokens`` counts BPE
    tokens, as in transformers' ``generate``.

    Sampled outputs depend on (seed, index of the prefix, sample index). ``first_index`` is the index of the
    first prefix here, so that a long input done in parts (``protlm generate`` resuming) samples exactly what
    one call over the whole input would.
    """
    config = GenerationConfig(**{**(config.to_dict() if config else {}), **overrides})
    config.validate()
    model, tok = pre.model, pre.tokenizer
    if getattr(model, "kind", None) == "causal-lm":  # GPT-2 / ProtGPT2: the prompt is continued directly
        from protlm.generation.causal import complete

        return [Completion(*c) for c in complete(pre, _as_records(prefixes), config, first_index)]
    if config.repetition_penalty != 1.0:
        raise ConfigError("repetition_penalty applies to causal LMs (GPT-2, ProtGPT2) only")
    require_decoder(model)
    records = _as_records(prefixes)
    if not records:
        return []
    prefix_ids = task_prefix(tok, "s2s")
    rows = []  # (record index, encoder ids, limit)
    for i, (rid, seq) in enumerate(records):
        if not isinstance(seq, str):
            raise InputError(f"{rid}: prefix must be a string of residues, got {type(seq).__name__}")
        seq = seq.strip().upper()
        if not seq:
            raise InputError(f"{rid}: empty prefix; completion needs at least one residue")
        ids = tok.residue_array(seq, record=rid)
        if len(ids) > config.max_length:
            raise InputError(f"{rid}: prefix has {len(ids)} residues, above the limit of {config.max_length} "
                             "(raise max_length / --max-length to allow it)")
        limit = config.limit_for(len(ids))
        if limit > config.max_length:
            raise InputError(f"{rid}: length ratio {config.length_ratio:g} asks for {limit} new tokens, above the "
                             f"limit of {config.max_length} (raise max_length / --max-length to allow it)")
        rows.append((i, prefix_ids + ids.tolist() + [tok.eos_id], limit))
    device = model_device(model)
    allowed = allowed_mask(tok, model.config.vocab_size, config.residues, allow_eos=True, device=device)
    results: dict[tuple[int, int], Completion] = {}
    # Length-sorted batches waste little padding in the encoder.
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    if config.strategy == "beam":
        per_batch = max(1, config.batch_size // config.num_beams)
        for start in range(0, len(order), per_batch):
            chunk = [rows[r] for r in order[start:start + per_batch]]
            enc, mask = _encode(model, tok, [c[1] for c in chunk], device)
            beams = beam_search(model, enc, mask, [c[2] for c in chunk], allowed, tok.eos_id, config.num_beams,
                                config.num_return, config.length_penalty, config.use_cache, config.min_new_tokens)
            for (i, _, _), hyps in zip(chunk, beams):
                for k, h in enumerate(hyps):
                    results[(i, k)] = _completion(records[i], k, h, tok)
    else:
        sampling = Sampling(greedy=config.strategy == "greedy", temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p)
        expanded = [(rows[r], k) for r in order for k in range(config.num_return)]
        for start in range(0, len(expanded), config.batch_size):
            chunk = expanded[start:start + config.batch_size]
            # the num_return samples of a prefix share one encoder pass
            unique = sorted({row[0] for row, _ in chunk})
            enc, mask = _encode(model, tok, [rows[i][1] for i in unique], device)
            index = torch.as_tensor([unique.index(row[0]) for row, _ in chunk], device=device)
            enc, mask = enc.index_select(0, index), mask.index_select(0, index)
            gens = None if sampling.greedy else row_generators(config.seed, [(first_index + row[0], k) for row, k in chunk])
            decoded = decode(model, enc, mask, [row[2] for row, _ in chunk], allowed, tok.eos_id, sampling, gens,
                             config.use_cache, config.min_new_tokens)
            for (row, k), d in zip(chunk, decoded):
                results[(row[0], k)] = _completion(records[row[0]], k, d, tok)
    return [results[key] for key in sorted(results)]


def _completion(record: tuple[str, str], k: int, d, tok) -> Completion:
    rid, seq = record
    return Completion(rid, k, seq.strip().upper(), tok.decode(d.ids), d.log_prob, d.stop, d.score)


@torch.inference_mode()
def _encode(model, tok, id_rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tok.pad(id_rows)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    return model.encode(ids, mask).last_hidden_state, mask


def to_fasta(completions: list[Completion], config: GenerationConfig, only_new: bool = False) -> str:
    """FASTA text: one record per completion, the settings and the outcome in the header."""
    settings = config.header()
    lines = []
    for c in completions:
        suffix = f"_gen{c.sample + 1}"
        head = (f">{c.id}{suffix} prefix_len={len(c.prefix)} new={len(c.continuation)} stop={c.stop} "
                f"logp={c.log_prob:.4f} {settings}")
        lines.append(head)
        seq = c.continuation if only_new else c.sequence
        lines.extend(seq[i:i + 60] for i in range(0, len(seq), 60))
        if not seq:  # a continuation that ended at once: keep an (empty) sequence line so the record stays visible
            lines.append("")
    return "\n".join(lines) + "\n"
