"""Decoding loops over a T5 decoder: greedy, sampling and beam search, incremental with the key/value cache.

These work on token ids and encoder states only; turning residue strings into encoder inputs and ids back into
sequences is the job of :mod:`protlm.generation.completion` and :mod:`protlm.generation.infilling`.

Design notes:
- Only tokens in ``allowed`` (the residues, plus ``</s>`` where ending is allowed) can be emitted: the other
  logits are set to -inf before any choice, so specials and sentinels never appear in a generated protein.
- Rows that have finished (``</s>`` or their length limit) are dropped from the batch and from the cache, so a
  batch costs what its live rows cost.
- Sampling draws its noise from one generator per row, seeded from (seed, input index, sample index). A row's
  output therefore does not depend on the batch size, the order of inputs or the other rows in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class Sampling:
    """How the next token is chosen from the (masked) logits."""

    greedy: bool = False  # True: argmax; False: sample from the filtered distribution below
    temperature: float = 1.0  # logits are divided by this before top-k/top-p; must be > 0
    top_k: int = 0  # keep the k most likely tokens (0 = no limit)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1.0 = no limit)


@dataclass
class Decoded:
    """One decoded continuation (ids exclude the decoder start token and the final ``</s>``)."""

    ids: list[int]
    log_prob: float  # sum of the model's log p(token) (full vocabulary), </s> included
    stop: str  # "eos" (the model ended it) or "length" (the row hit its limit)
    score: float | None = None  # beam search only: log_prob / length**length_penalty, the ranking key


def row_generators(seed: int, keys: list[tuple[int, ...]]) -> list[torch.Generator]:
    """One CPU generator per row, seeded from (seed, *key) through numpy's SeedSequence (well-separated streams)."""
    gens = []
    for key in keys:
        state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
        g = torch.Generator()
        g.manual_seed(int(state[0]) << 32 | int(state[1]))
        gens.append(g)
    return gens


def filter_logits(logits: Tensor, s: Sampling) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus); removed tokens get -inf. ``logits`` is (B, V) float."""
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def choose(logits: Tensor, s: Sampling, generators: list[torch.Generator] | None) -> Tensor:
    """Next token per row from masked logits (B, V): argmax, or a sample via the Gumbel-max trick."""
    if s.greedy:
        return logits.argmax(-1)
    filtered = filter_logits(logits, s)
    # argmax(logits + Gumbel noise) is a draw from softmax(logits); drawing the noise row by row from each
    # row's own generator is what makes a row's sample independent of the batch it happens to be in.
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in generators])
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300))).to(device=logits.device, dtype=filtered.dtype)
    return (filtered + gumbel).argmax(-1)


def _step_logits(model, tokens: Tensor, enc: Tensor, enc_mask: Tensor, cache) -> Tensor:
    """Next-token logits (B, V) in fp32. With a cache, ``tokens`` holds only the new tokens."""
    out = model.decode(tokens, enc, enc_mask, cache=cache)
    return model.lm_logits(out.last_hidden_state[:, -1]).float()


@torch.inference_mode()
def decode(
    model,
    enc: Tensor,  # (B, Le, d_model) encoder output
    enc_mask: Tensor,  # (B, Le)
    max_new: list[int],  # per-row limit on generated tokens (</s> included)
    allowed: Tensor,  # (V,) bool, tokens that may be emitted
    eos_id: int,
    sampling: Sampling,
    generators: list[torch.Generator] | None = None,
    use_cache: bool = True,
    min_new: int = 0,  # </s> is not allowed before this many tokens
) -> list[Decoded]:
    """Greedy or sampled decoding of B rows; each row stops at ``</s>`` or at its own ``max_new``."""
    n = enc.shape[0]
    device = enc.device
    start = model.config.decoder_start_token_id
    steps = int(max(max_new))
    live = torch.arange(n, device=device)  # original row index of each live row
    limits = torch.as_tensor(max_new, device=device)
    gens = list(generators) if generators is not None else None
    no_eos = allowed.clone()
    no_eos[eos_id] = False
    # Outputs stay on the device until the end; the only host sync per step is the "who finished" list.
    tokens = torch.full((n, steps), -1, dtype=torch.long, device=device)  # -1 = not generated
    log_prob = torch.zeros(n, dtype=torch.float64, device=device)
    cache = model.new_cache() if use_cache else None
    step_in = torch.full((n, 1), start, dtype=torch.long, device=device)
    history = step_in  # every decoder input so far; only used without a cache
    for step in range(steps):
        logits = _step_logits(model, step_in if use_cache else history, enc, enc_mask, cache)
        nxt = choose(logits.masked_fill(~(allowed if step >= min_new else no_eos), NEG_INF), sampling, gens)
        tokens[live, step] = nxt
        log_prob[live] += logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0].double()
        done = ((nxt == eos_id) | (limits[live] <= step + 1)).tolist()
        if all(done):
            break
        if any(done):
            keep = torch.as_tensor([i for i, d in enumerate(done) if not d], device=device)
            live, nxt, enc, enc_mask, history = live[keep], nxt[keep], enc[keep], enc_mask[keep], history[keep]
            if cache is not None:
                cache.reorder(keep)
            if gens is not None:
                gens = [gens[i] for i in keep.tolist()]
        step_in = nxt[:, None]
        if not use_cache:
            history = torch.cat([history, step_in], dim=1)
    results = []
    for row, lp in zip(tokens.tolist(), log_prob.tolist()):
        ids = [t for t in row if t >= 0]
        ended = bool(ids) and ids[-1] == eos_id
        results.append(Decoded(ids[:-1] if ended else ids, lp, "eos" if ended else "length"))
    return results


@dataclass
class _Hypothesis:
    score: float
    ids: list[int]
    log_prob: float
    stop: str


@torch.inference_mode()
def beam_search(
    model,
    enc: Tensor,  # (B, Le, d_model), one row per input
    enc_mask: Tensor,  # (B, Le)
    max_new: list[int],  # per-input limit on generated tokens
    allowed: Tensor,  # (V,) bool
    eos_id: int,
    num_beams: int,
    num_return: int = 1,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    min_new: int = 0,  # </s> is not allowed before this many tokens
) -> list[list[Decoded]]:
    """Beam search; returns the ``num_return`` best hypotheses of each input, best first.

    A hypothesis's score is its summed log-probability divided by (generated tokens, </s> included) **
    ``length_penalty``. At each step the 2*beams best extensions are considered; one ending in </s> becomes a
    finished hypothesis if it ranks among the top ``num_beams``; the best ``num_beams`` others stay alive. An
    input is done once it has ``num_beams`` finished hypotheses, or at its length limit, where the live beams
    are finished as they are. This is the search of ``transformers`` ``generate(num_beams=..., early_stopping=True)``
    (checked token for token in the tests).
    """
    b = num_beams
    n = enc.shape[0]
    no_eos = allowed.clone()
    no_eos[eos_id] = False
    device = enc.device
    vocab = allowed.shape[0]
    start = model.config.decoder_start_token_id
    enc = enc.repeat_interleave(b, 0)
    enc_mask = enc_mask.repeat_interleave(b, 0)
    # only beam 0 of each input is real at the first step; the others would duplicate it
    beam_scores = torch.zeros(n, b, device=device)
    beam_scores[:, 1:] = NEG_INF
    beam_ids: list[list[list[int]]] = [[[] for _ in range(b)] for _ in range(n)]
    finished: list[list[_Hypothesis]] = [[] for _ in range(n)]
    live = list(range(n))  # original input index of each live input
    cache = model.new_cache() if use_cache else None
    step_in = torch.full((n * b, 1), start, dtype=torch.long, device=device)
    history = step_in
    for step in range(int(max(max_new))):
        logits = _step_logits(model, step_in if use_cache else history, enc, enc_mask, cache)
        # Beams rank by the model's own log-probability (full vocabulary) of the allowed tokens, as
        # transformers does when a logits processor masks tokens after the log-softmax.
        logp = logits.log_softmax(-1).masked_fill(~(allowed if step >= min_new else no_eos), NEG_INF)
        logp = logp.view(len(live), b, vocab)
        cand = (beam_scores[:, :, None] + logp).view(len(live), b * vocab)
        top_scores, top_idx = cand.topk(2 * b, dim=-1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        new_scores = torch.full((len(live), b), NEG_INF, device=device)
        new_tokens = torch.full((len(live), b), eos_id, dtype=torch.long, device=device)
        source = (torch.arange(len(live), device=device) * b)[:, None].repeat(1, b)  # dead beams point at their own row
        keep_inputs = []
        for j, inp in enumerate(live):
            hyps = finished[inp]
            n_gen = step + 1
            kept = 0
            new_ids = []
            for rank, (s, idx) in enumerate(zip(top_scores[j], top_idx[j])):
                if s == NEG_INF:
                    break
                beam, tok = divmod(idx, vocab)
                if tok == eos_id:
                    if rank < b:
                        hyps.append(_Hypothesis(s / n_gen ** length_penalty, list(beam_ids[j][beam]), s, "eos"))
                    continue
                new_ids.append(beam_ids[j][beam] + [tok])
                new_scores[j, kept] = s
                new_tokens[j, kept] = tok
                source[j, kept] = j * b + beam
                kept += 1
                if kept == b:
                    break
            at_limit = n_gen >= max_new[inp]
            if at_limit:
                for ids, s in zip(new_ids, new_scores[j, :kept].tolist()):
                    hyps.append(_Hypothesis(s / n_gen ** length_penalty, ids, s, "length"))
            if len(hyps) >= b or at_limit or kept == 0:
                continue
            while len(new_ids) < b:  # fewer live extensions than beams (tiny vocabularies): pad with dead beams
                new_ids.append([])
            beam_ids[j] = new_ids
            keep_inputs.append(j)
        if not keep_inputs:
            break
        keep = torch.as_tensor(keep_inputs, device=device)
        rows = source[keep].reshape(-1)
        beam_scores = new_scores[keep]
        beam_ids = [beam_ids[j] for j in keep_inputs]
        live = [live[j] for j in keep_inputs]
        enc, enc_mask = enc.index_select(0, rows), enc_mask.index_select(0, rows)
        step_in = new_tokens[keep].reshape(-1, 1)
        if cache is not None:
            cache.reorder(rows)
        else:
            history = torch.cat([history.index_select(0, rows), step_in], dim=1)
    results = []
    for hyps in finished:
        hyps = sorted(hyps, key=lambda h: h.score, reverse=True)[:num_return]
        results.append([Decoded(h.ids, h.log_prob, h.stop, h.score) for h in hyps])
    return results
