"""Generation and scoring with causal LMs (GPT-2 / ProtGPT2: ``model.kind == "causal-lm"``).

Input follows ProtGPT2's convention (:mod:`protlm.tokenizer.bpe`): ``<|endoftext|>``, a line break, residues in
lines of 60. A prompt is that text left open; the model continues it token by token (a token holds one or
several residues, or a line break) until it writes ``<|endoftext|>`` or reaches ``max_new_tokens`` (tokens, not
residues, as in transformers' ``generate``).

- Sampling: repetition penalty (CTRL's, as transformers applies it: a logit of a token already in the row's
  prompt or output is divided by the penalty when positive, multiplied when negative), then temperature, top-k
  and top-p (:func:`protlm.generation.decoding.filter_logits`), then a draw from each row's own generator, so a
  row's sample depends on (seed, prompt index, sample index) and not on the batch.
- Only tokens made of residues, line breaks and ``<|endoftext|>`` may be emitted (``restrict``).
- Prompts are left-padded into one batch; positions count real tokens, so padding changes nothing. Rows that
  finish leave the batch and the key/value cache.

Scores: the log-likelihood of a protein is the sum of log p(token | tokens before it) over every token after the
opening ``<|endoftext|>``, the closing one included (the model's probability of writing exactly this protein
and ending it). A variant's score is log-likelihood(mutant) - log-likelihood(wild type). A protein whose tokens
exceed the model's ``n_positions`` is refused with the limit named: windows would score a different quantity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from protlm.errors import InputError
from protlm.generation.decoding import NEG_INF, Decoded, Sampling, choose, row_generators
from protlm.generation.tokens import model_device


def is_causal_lm(model) -> bool:
    return getattr(model, "kind", None) == "causal-lm"


def allowed_tokens(tokenizer, vocab_size: int, device) -> Tensor:
    """(V,) bool: residue tokens, line-break tokens and <|endoftext|>."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.as_tensor(tokenizer.residue_token_ids)] = True
    mask[torch.as_tensor(tokenizer.newline_token_ids)] = True
    mask[tokenizer.eos_id] = True
    return mask.to(device)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on the tokens of ``seen`` (B, V bool)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@torch.inference_mode()
def decode_causal(model, prompts: list[list[int]], max_new: list[int], sampling: Sampling, eos_id: int,
                  allowed: Tensor | None = None, generators: list[torch.Generator] | None = None,
                  repetition_penalty: float = 1.0, stop_at_eos: bool = True, min_new: int = 0,
                  use_cache: bool = True) -> list[Decoded]:
    """Continue each prompt (token ids); ``Decoded.ids`` excludes the prompt and the final <|endoftext|>."""
    device = model_device(model)
    n, width = len(prompts), max(len(p) for p in prompts)
    limit = model.config.n_positions
    for i, p in enumerate(prompts):
        if len(p) + max_new[i] > limit:
            raise InputError(f"prompt {i + 1}: {len(p)} tokens plus {max_new[i]} new ones exceed the model's "
                             f"{limit} positions (n_positions); lower max_new_tokens or shorten the prompt")
    ids = torch.full((n, width), eos_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    vocab = model.config.vocab_size
    seen = torch.zeros((n, vocab), dtype=torch.bool, device=device)
    seen.scatter_(1, ids, mask.bool())
    live = torch.arange(n, device=device)
    limits = torch.as_tensor(max_new, device=device)
    gens = list(generators) if generators is not None else None
    no_eos = allowed.clone() if allowed is not None else torch.ones(vocab, dtype=torch.bool, device=device)
    no_eos[eos_id] = False
    steps = int(max(max_new))
    tokens = torch.full((n, steps), -1, dtype=torch.long, device=device)
    log_prob = torch.zeros(n, dtype=torch.float64, device=device)
    cache = model.new_cache() if use_cache else None
    step_in, history = ids, ids
    for step in range(steps):
        out = model.encode(step_in if use_cache else history, mask, cache=cache)
        logits = model.lm_logits(out.last_hidden_state[:, -1]).float()
        full = logits.log_softmax(-1)
        scored = apply_repetition_penalty(logits, seen, repetition_penalty)
        allow = no_eos if step < min_new else allowed
        if allow is not None:
            scored = scored.masked_fill(~allow, NEG_INF)
        nxt = choose(scored, sampling, gens)
        tokens[live, step] = nxt
        log_prob[live] += full.gather(1, nxt[:, None])[:, 0].double()
        seen[torch.arange(len(live), device=device), nxt] = True
        finished = limits[live] <= step + 1
        if stop_at_eos:
            finished |= nxt == eos_id
        done = finished.tolist()
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        history = torch.cat([history, nxt[:, None]], dim=1)
        step_in = nxt[:, None]
        if any(done):
            keep = torch.as_tensor([i for i, d in enumerate(done) if not d], device=device)
            live, step_in, mask, seen, history = live[keep], step_in[keep], mask[keep], seen[keep], history[keep]
            if cache is not None:
                cache.reorder(keep)
            if gens is not None:
                gens = [gens[i] for i in keep.tolist()]
    results = []
    for row, lp in zip(tokens.tolist(), log_prob.tolist()):
        got = [t for t in row if t >= 0]
        ended = stop_at_eos and bool(got) and got[-1] == eos_id
        results.append(Decoded(got[:-1] if ended else got, lp, "eos" if ended else "length"))
    return results


def generate_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool = False,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    seed: int = 0, restrict: bool = True, stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids for each residue prompt (a small library entry point; ``protlm generate`` goes through
    :func:`protlm.generation.generate`)."""
    rows = [tokenizer.encode(p, add_eos=False, record=f"prompt {i + 1}") for i, p in enumerate(prompts)]
    sampling = Sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    gens = None if greedy else row_generators(seed, [(i, 0) for i in range(len(rows))])
    allowed = allowed_tokens(tokenizer, model.config.vocab_size, model_device(model)) if restrict else None
    decoded = decode_causal(model, rows, [max_new_tokens] * len(rows), sampling, tokenizer.eos_id, allowed, gens,
                            repetition_penalty, stop_at_eos)
    return [d.ids for d in decoded]


def complete(pre, records: list[tuple[str, str]], config, first_index: int = 0) -> list[tuple]:
    """``protlm generate`` for a causal LM: (id, sample, prefix, continuation, log_prob, stop, None) per output,
    in input order (the fields of :class:`protlm.generation.completion.Completion`)."""
    from protlm.errors import ConfigError

    if config.strategy == "beam":
        raise ConfigError("beam search is not implemented for causal LMs (GPT-2, ProtGPT2); sample or use --greedy")
    model, tok = pre.model, pre.tokenizer
    device = model_device(model)
    allowed = allowed_tokens(tok, model.config.vocab_size, device)
    if config.residues == "standard":  # drop tokens holding X, U, Z, O or B
        from protlm.tokenizer.vocab import STANDARD

        standard, residue_tokens = set(STANDARD), set(tok.residue_token_ids.tolist())
        for t, i in tok.vocab.items():
            if i in residue_tokens and not set(t) <= standard:
                allowed[i] = False
    rows = []  # (record index, prompt ids, limit)
    for i, (rid, seq) in enumerate(records):
        if not isinstance(seq, str) or not seq.strip():
            raise InputError(f"{rid}: empty prefix; completion needs at least one residue")
        seq = seq.strip().upper()
        ids = tok.encode(seq, add_eos=False, record=rid)
        rows.append((i, ids, config.limit_for(len(seq))))
    sampling = Sampling(greedy=config.strategy == "greedy", temperature=config.temperature, top_k=config.top_k,
                        top_p=config.top_p)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    expanded = [(rows[r], k) for r in order for k in range(config.num_return)]
    out = {}
    for start in range(0, len(expanded), config.batch_size):
        chunk = expanded[start:start + config.batch_size]
        gens = None if sampling.greedy else row_generators(config.seed, [(first_index + row[0], k) for row, k in chunk])
        decoded = decode_causal(model, [row[1] for row, _ in chunk], [row[2] for row, _ in chunk], sampling,
                                tok.eos_id, allowed, gens, config.repetition_penalty, True, config.min_new_tokens,
                                config.use_cache)
        for (row, k), d in zip(chunk, decoded):
            rid, seq = records[row[0]]
            out[(row[0], k)] = (rid, k, seq.strip().upper(), tok.decode(d.ids), d.log_prob, d.stop, None)
    return [out[key] for key in sorted(out)]


# --- scores --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def token_log_probs(pre, sequences: list[str], records: list[str] | None = None,
                    token_budget: int = 16384) -> list[np.ndarray]:
    """Per sequence: log p(token | tokens before it) for every token after the opening <|endoftext|> (float64);
    the sum is the protein's log-likelihood (see the module docstring)."""
    model, tok = pre.model, pre.tokenizer
    device = model_device(model)
    limit = model.config.n_positions
    rows = []
    for i, seq in enumerate(sequences):
        rid = records[i] if records else f"<sequence {i}>"
        ids = tok.encode(seq.strip(), record=rid)
        if len(ids) > limit:
            raise InputError(f"{rid}: {len(seq.strip())} residues make {len(ids)} tokens, above the model's {limit} "
                             "positions (n_positions); a causal LM's likelihood is not windowed")
        rows.append(ids)
    out: list[np.ndarray] = [np.zeros(0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    start = 0
    while start < len(order):
        end = start + 1  # rows are sorted by length, so a chunk's last row sets its padded width
        while end < len(order) and (end + 1 - start) * len(rows[order[end]]) <= token_budget:
            end += 1
        chunk = order[start:end]
        batch = tok.pad([rows[r] for r in chunk])
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        logp = model(ids, mask).float().log_softmax(-1)[:, :-1]  # position t predicts token t + 1
        picked = logp.gather(-1, ids[:, 1:, None])[..., 0].double().cpu().numpy()
        for j, r in enumerate(chunk):
            out[r] = picked[j, :len(rows[r]) - 1]
        start += len(chunk)
    return out


def log_likelihoods(pre, sequences: list[str], records: list[str] | None = None,
                    token_budget: int = 16384) -> np.ndarray:
    """log p(protein) under a causal LM for each sequence, float64."""
    return np.array([lp.sum() for lp in token_log_probs(pre, sequences, records, token_budget)], dtype=np.float64)
