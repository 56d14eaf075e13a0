"""Infilling through the denoising task: masked positions become sentinels, the decoder names each one.

The encoder reads ``[NLU]`` + the sequence with the i-th masked position replaced by sentinel i + ``</s>``; the
decoder writes ``sentinel_0 residue_0 sentinel_1 residue_1 ...`` as in 1-gram denoising pretraining. Here the
sentinels are forced (they are known) and only the residues are chosen, left to right, so each position is
filled knowing the residues already placed before it. Per-position probabilities are over the allowed residues
(the model's distribution at that step, renormalised after removing non-residue tokens).

Masked-LM models (ESM-2, DPLM; ``model.kind == "masked-lm"``) have no decoder: every masked position becomes
``<mask>`` and one forward pass predicts them all at once, each from the unmasked residues only (no iterative
refinement; the CLI has no option for it). Greedy takes each position's most likely allowed residue; sampling
draws each position independently from its own distribution. The allowed residues are the same as for T5 (the
20 standard ones by default, ``residues="all"`` adds X/U/Z/O/B); specials, ``<mask>`` and ``.``/``-`` never.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from protlm.errors import ConfigError, InputError
from protlm.generation.decoding import NEG_INF, Sampling, choose, row_generators
from protlm.generation.masked import DEFAULT_TOKEN_BUDGET, infill_logits
from protlm.generation.tokens import (
    allowed_mask, model_device, require_decoder, residue_alphabet, residue_ids, task_prefix,
)

MASK_TOKENS = ("[?]", "?")


@dataclass(frozen=True)
class MaskedSequence:
    id: str
    template: str  # the sequence with "?" at each masked position
    positions: tuple[int, ...]  # 0-based masked positions, ascending

    @property
    def text(self) -> str:
        return self.template.replace("?", "[?]")


@dataclass
class Infilled:
    id: str
    sample: int  # 0-based index among the outputs for this input
    masked: MaskedSequence
    sequence: str  # the filled sequence
    residues: str  # the residue chosen at each masked position, in position order
    probabilities: list[float]  # probability of each chosen residue (over the allowed residues)
    distributions: np.ndarray  # (n_masked, len(alphabet)) probabilities at each masked position
    alphabet: str  # column order of ``distributions``
    log_prob: float  # sum of log ``probabilities``


def parse_masked(text: str, record: str = "masked") -> MaskedSequence:
    """``MKT[?]AL[?][?]`` (or ``MKT?AL??``) -> template ``MKT?AL??`` and positions (3, 6, 7)."""
    template = text.strip().upper().replace("[?]", "?")
    if not template:
        raise InputError(f"{record}: empty sequence")
    if "[" in template or "]" in template:
        pos = template.find("[") if "[" in template else template.find("]")
        raise InputError(f"{record}: stray bracket at position {pos + 1}; write a masked position as [?] or ?")
    positions = tuple(i for i, c in enumerate(template) if c == "?")
    if not positions:
        raise InputError(f"{record}: no masked positions; mark them with [?] (e.g. MKT[?]AL)")
    return MaskedSequence(record, template, positions)


def mask_positions(sequence: str, positions: list[int], record: str = "sequence", first_index: int = 1) -> MaskedSequence:
    """Mask the given (1-based by default) positions of ``sequence``."""
    seq = sequence.strip().upper()
    if not seq:
        raise InputError(f"{record}: empty sequence")
    if not positions:
        raise InputError(f"{record}: no positions to mask")
    chars = list(seq)
    for p in positions:
        i = p - first_index
        if not 0 <= i < len(seq):
            raise InputError(f"{record}: position {p} is outside the sequence ({first_index}..{len(seq) + first_index - 1})")
        chars[i] = "?"
    template = "".join(chars)
    return MaskedSequence(record, template, tuple(i for i, c in enumerate(template) if c == "?"))


def parse_positions(text: str) -> list[int]:
    """``"4,7-9"`` -> [4, 7, 8, 9]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if m is None:
            raise InputError(f"cannot read position {part!r} (expected e.g. 4,7-9)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise InputError(f"position range {part!r} runs backwards")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def denoising_input(tokenizer, template: str, record: str) -> list[int]:
    """Encoder ids: [NLU] + residues with the k-th "?" replaced by sentinel k + </s>."""
    if not tokenizer.sentinel_ids:
        raise ConfigError("this vocabulary has no sentinel tokens; infilling and scoring need a denoising model")
    n_masks = template.count("?")
    if n_masks > len(tokenizer.sentinel_ids):
        raise InputError(f"{record}: {n_masks} masked positions, but the vocabulary has only "
                         f"{len(tokenizer.sentinel_ids)} sentinels (one per masked position)")
    filler = template.replace("?", "A")  # any residue; the placeholders are overwritten below
    ids = tokenizer.residue_array(filler, record=record).copy()
    for k, pos in enumerate(i for i, c in enumerate(template) if c == "?"):
        ids[pos] = tokenizer.sentinel_ids[k]
    return task_prefix(tokenizer, "nlu") + ids.tolist() + [tokenizer.eos_id]


@torch.inference_mode()
def infill(pre, masked, num: int = 1, strategy: str = "greedy", temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, residues: str = "standard", batch_size: int = 16) -> list[Infilled]:
    """Fill the masked positions of each input; ``num`` outputs per input (greedy allows one).

    ``masked`` is a string like ``"MKT[?]AL[?]"``, a :class:`MaskedSequence`, or a list of either.
    """
    if strategy not in ("greedy", "sample"):
        raise ConfigError(f"infill strategy must be greedy or sample, got {strategy!r}")
    if strategy == "greedy" and num != 1:
        raise ConfigError(f"greedy infilling gives one result per input, not {num}; use strategy='sample'")
    if num < 1:
        raise ConfigError(f"num must be at least 1, got {num}")
    sampling = Sampling(greedy=strategy == "greedy", temperature=temperature, top_k=top_k, top_p=top_p)
    if not sampling.greedy and not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    model, tok = pre.model, pre.tokenizer
    items = [masked] if isinstance(masked, (str, MaskedSequence)) else list(masked)
    inputs = [m if isinstance(m, MaskedSequence) else parse_masked(m, record=f"masked{i + 1}")
              for i, m in enumerate(items)]
    if model.kind == "masked-lm":
        return _fill_masked_lm(pre, inputs, num, sampling, seed, residues)
    if model.kind == "causal-lm":
        raise ConfigError("a causal LM (GPT-2, ProtGPT2) reads left to right and cannot fill positions inside a "
                          "protein; use 'protlm generate' to continue a prefix, or a T5/ESM-2 model to infill")
    require_decoder(model)
    device = model_device(model)
    allowed = allowed_mask(tok, model.config.vocab_size, residues, allow_eos=False, device=device)
    alphabet = residue_alphabet(tok, residues)
    alphabet_ids = torch.as_tensor(residue_ids(tok, residues), device=device)
    out = []
    for index, m in enumerate(inputs):
        enc_ids = denoising_input(tok, m.template, m.id)
        for start in range(0, num, batch_size):
            samples = list(range(start, min(num, start + batch_size)))
            gens = None if sampling.greedy else row_generators(seed, [(index, k) for k in samples])
            out.extend(_fill_batch(model, tok, m, enc_ids, samples, sampling, gens, allowed, alphabet,
                                   alphabet_ids, device))
    return out


def _fill_batch(model, tok, m: MaskedSequence, enc_ids: list[int], samples: list[int], sampling: Sampling, gens,
                allowed, alphabet: str, alphabet_ids, device) -> list[Infilled]:
    n = len(samples)
    ids = torch.as_tensor([enc_ids], device=device)
    enc = model.encode(ids, torch.ones_like(ids)).last_hidden_state.expand(n, -1, -1)
    enc_mask = torch.ones((n, ids.shape[1]), dtype=torch.long, device=device)
    cache = model.new_cache()
    start = torch.full((n, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    # Each step feeds (previous residue, next sentinel) at once; the first feeds (start, sentinel_0).
    step_in = torch.cat([start, torch.full((n, 1), tok.sentinel_ids[0], device=device)], dim=1)
    chosen = []
    dists = []
    for k in range(len(m.positions)):
        h = model.decode(step_in, enc, enc_mask, cache=cache).last_hidden_state[:, -1]
        logits = model.lm_logits(h).float().masked_fill(~allowed, NEG_INF)
        nxt = choose(logits, sampling, gens)
        dists.append(logits.softmax(-1)[:, alphabet_ids])  # (n, len(alphabet))
        chosen.append(nxt)
        if k + 1 < len(m.positions):
            step_in = torch.stack([nxt, torch.full_like(nxt, tok.sentinel_ids[k + 1])], dim=1)
    chosen_t = torch.stack(chosen, 1).cpu()  # (n, M)
    dist_t = torch.stack(dists, 1).cpu().numpy()  # (n, M, A)
    col = {int(t): j for j, t in enumerate(alphabet_ids.tolist())}
    results = []
    for r, k in enumerate(samples):
        letters = tok.decode(chosen_t[r])
        probs = [float(dist_t[r, j, col[int(t)]]) for j, t in enumerate(chosen_t[r])]
        filled = list(m.template)
        for pos, aa in zip(m.positions, letters):
            filled[pos] = aa
        results.append(Infilled(m.id, k, m, "".join(filled), letters, probs, dist_t[r], alphabet,
                                float(np.sum(np.log(probs)))))
    return results


def _fill_masked_lm(pre, inputs: list[MaskedSequence], num: int, sampling: Sampling, seed: int,
                    residues: str) -> list[Infilled]:
    """One pass per input (batched by tokens) gives every masked position's logits; ``num`` fills are drawn."""
    tok = pre.tokenizer
    allowed = allowed_mask(tok, pre.model.config.vocab_size, residues, allow_eos=False)
    alphabet = residue_alphabet(tok, residues)
    alphabet_ids = residue_ids(tok, residues)
    col = {t: j for j, t in enumerate(alphabet_ids)}
    out = []
    for index, (m, logits) in enumerate(zip(inputs, infill_logits(pre, inputs, DEFAULT_TOKEN_BUDGET))):
        logits = logits.masked_fill(~allowed, NEG_INF)  # (n_masked, V)
        dist = logits.softmax(-1)[:, alphabet_ids].numpy()  # (n_masked, len(alphabet))
        for k in range(num):
            # one generator per (input, sample, position): a fill does not depend on the other inputs
            gens = None if sampling.greedy else row_generators(seed, [(index, k, j) for j in range(len(m.positions))])
            chosen = choose(logits, sampling, gens).tolist()
            letters = tok.decode(chosen)
            probs = [float(dist[j, col[t]]) for j, t in enumerate(chosen)]
            filled = list(m.template)
            for pos, aa in zip(m.positions, letters):
                filled[pos] = aa
            out.append(Infilled(m.id, k, m, "".join(filled), letters, probs, dist, alphabet,
                                float(np.sum(np.log(probs)))))
    return out
