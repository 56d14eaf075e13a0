"""Zero-shot scores: pseudo-log-likelihood and masked-marginal variant effects.

Every function here takes any model of the protocol and branches on ``model.kind``: masked-LM models (ESM-2,
DPLM) are scored by :mod:`protlm.generation.masked` (its docstring has their definitions, including
``strategy="wt-marginal"`` and long sequences); causal LMs (GPT-2, ProtGPT2) by :mod:`protlm.generation.causal`
(``strategy="llr"``: log-likelihood of the mutant minus that of the wild type; the "pseudo"-log-likelihood of a
causal LM is its exact log-likelihood); the rest of this docstring is about encoder-decoder (T5) models.

A position is "masked" by replacing it with sentinel 0 in the encoder input (``[NLU]`` + residues + ``</s>``);
the decoder reads ``<start> sentinel_0`` and its next-token distribution is the model's belief about that
position given all the others. Log-probabilities are over the full vocabulary (the model's own numbers).

- Pseudo-log-likelihood of a sequence: sum over positions i of log p(x_i | x without i).
- Masked marginal (Meier et al., NeurIPS 2021, "Language models enable zero-shot prediction of the effects of
  mutations on protein function"): log p(mut) - log p(wt) at a masked position of the wild type, summed over
  the positions of a multi-mutant. Each position is masked on its own, so one table of (positions x 20
  residues) scores every variant at those positions; a deep mutational scan costs one forward per position.
- ``strategy="joint"`` masks all of a variant's positions together (sentinel k for the k-th) and lets the
  decoder fill them in order: score = log P(mutant residues) - log P(wild-type residues), chain rule over the
  decoder steps. Unlike the masked marginal it can express interactions between the mutated positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protlm.errors import ConfigError, InputError
from protlm.generation import causal, masked
from protlm.generation.infilling import denoising_input
from protlm.generation.mutations import STANDARD_RESIDUES, Variant, check_wildtype, parse_variant
from protlm.generation.tokens import model_device, require_decoder

STRATEGIES = ("masked-marginal", "wt-marginal", "joint", "llr")
MASKED_LM_STRATEGIES = ("masked-marginal", "wt-marginal")
ENCODER_DECODER_STRATEGIES = ("masked-marginal", "joint")
CAUSAL_LM_STRATEGIES = ("llr",)
DEFAULT_TOKEN_BUDGET = 16384  # encoder tokens per forward pass


@dataclass
class MarginalTable:
    """log p(residue | wild type with that position masked), for a set of positions."""

    wildtype: str
    positions: tuple[int, ...]  # 0-based
    alphabet: str  # column order (the 20 standard residues)
    log_probs: np.ndarray  # (len(positions), len(alphabet))

    def log_prob(self, position: int, residue: str) -> float:
        return float(self.log_probs[self.positions.index(position), self.alphabet.index(residue)])


def is_masked_lm(model) -> bool:
    return model.kind == "masked-lm"


def _rows_per_batch(length: int, token_budget: int) -> int:
    return max(1, token_budget // max(1, length))


def _single_mask_logprobs(pre, sequence: str, positions: list[int], record: str, token_budget: int) -> torch.Tensor:
    """(len(positions), vocab) log-probabilities at each position, masked one at a time; fp32 on CPU."""
    model, tok = pre.model, pre.tokenizer
    require_decoder(model)
    device = model_device(model)
    base = torch.as_tensor(denoising_input(tok, sequence, record), device=device)
    offset = len(base) - len(sequence) - 1  # the task prefix, if any
    start = model.config.decoder_start_token_id
    out = []
    step = _rows_per_batch(len(base), token_budget)
    with torch.inference_mode():
        for lo in range(0, len(positions), step):
            chunk = torch.as_tensor(positions[lo:lo + step], device=device)
            ids = base.repeat(len(chunk), 1)
            ids[torch.arange(len(chunk), device=device), chunk + offset] = tok.sentinel_ids[0]
            mask = torch.ones_like(ids)
            dec = torch.tensor([[start, tok.sentinel_ids[0]]], device=device).expand(len(chunk), -1)
            enc = model.encode(ids, mask).last_hidden_state
            h = model.decode(dec, enc, mask).last_hidden_state[:, -1]
            out.append(model.lm_logits(h).float().log_softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.vocab_size)


def masked_marginals(pre, wildtype: str, positions=None, token_budget: int = DEFAULT_TOKEN_BUDGET) -> MarginalTable:
    """The table of masked-marginal log-probabilities at ``positions`` (0-based; default: every position).

    T5: full-vocabulary log-probabilities; masked-LM: over the 20 standard residues (see
    :mod:`protlm.generation.masked`). Differences within a row are the same either way.
    """
    return _marginal_table(pre, wildtype, positions, token_budget, "masked-marginal")


def _marginal_table(pre, wildtype: str, positions, token_budget: int, strategy: str) -> MarginalTable:
    wildtype = check_wildtype(wildtype)
    positions = sorted(set(range(len(wildtype)) if positions is None else positions))
    for p in positions:
        if not 0 <= p < len(wildtype):
            raise InputError(f"position {p + 1} is outside the wild type (1..{len(wildtype)})")
    if is_masked_lm(pre.model):
        run = masked.masked_marginal_logprobs if strategy == "masked-marginal" else masked.wt_marginal_logprobs
        lp = run(pre, wildtype, positions, token_budget)
        return MarginalTable(wildtype, tuple(positions), STANDARD_RESIDUES, lp.numpy().astype(np.float64))
    lp = _single_mask_logprobs(pre, wildtype, positions, "wild type", token_budget)
    cols = [pre.tokenizer.residue_ids[aa] for aa in STANDARD_RESIDUES]
    return MarginalTable(wildtype, tuple(positions), STANDARD_RESIDUES, lp[:, cols].numpy().astype(np.float64))


def pseudo_log_likelihood(pre, sequences, token_budget: int = DEFAULT_TOKEN_BUDGET,
                          per_position: bool = False):
    """Pseudo-log-likelihood of each sequence (sum over positions of log p(x_i | rest)).

    Returns an array of floats, or with ``per_position`` a list of (L,) arrays (causal LMs: one entry per token
    after the opening <|endoftext|>, whose sum is the exact log-likelihood). ``sequences`` is a string or a
    list of strings / (id, sequence) pairs.
    """
    items = [sequences] if isinstance(sequences, str) else list(sequences)
    records = []
    for i, item in enumerate(items):
        rid, seq = (f"sequence {i + 1}", item) if isinstance(item, str) else (str(item[0]), item[1])
        seq = seq.strip().upper()
        if not seq:
            raise InputError(f"{rid}: empty sequence")
        records.append((rid, seq))
    if is_masked_lm(pre.model):
        results = masked.pll_per_position(pre, records, token_budget)
    elif causal.is_causal_lm(pre.model):  # per token (the closing <|endoftext|> included), not per residue
        results = causal.token_log_probs(pre, [s for _, s in records], [r for r, _ in records], token_budget)
    else:
        results = [_t5_pll(pre, rid, seq, token_budget) for rid, seq in records]
    if per_position:
        return results
    return np.array([r.sum() for r in results])


def _t5_pll(pre, rid: str, seq: str, token_budget: int) -> np.ndarray:
    ids = pre.tokenizer.residue_array(seq, record=rid)
    lp = _single_mask_logprobs(pre, seq, list(range(len(seq))), rid, token_budget)
    return lp.gather(1, torch.as_tensor(ids)[:, None])[:, 0].numpy().astype(np.float64)


def parse_variants(wildtype: str, variants, first_index: int = 1) -> list[Variant]:
    wildtype = check_wildtype(wildtype)
    return [v if isinstance(v, Variant) else parse_variant(v, wildtype, first_index) for v in variants]


def score_variants(pre, wildtype: str, variants, strategy: str | None = None, first_index: int = 1,
                   token_budget: int = DEFAULT_TOKEN_BUDGET) -> np.ndarray:
    """Zero-shot score of each variant (higher = more like the wild type's family, by the model).

    ``variants`` are strings (``"A23G"``, ``"A23G:V40L"``; wild-type residues are checked) or
    :class:`~protlm.generation.mutations.Variant` objects. The wild type itself scores 0. ``strategy``:
    "masked-marginal" (masked-LM and encoder-decoder models), "wt-marginal" (masked-LM models), "joint"
    (encoder-decoder models), "llr" (causal LMs); None: the first of those the model's kind allows.
    """
    causal_lm = causal.is_causal_lm(pre.model)
    allowed = (CAUSAL_LM_STRATEGIES if causal_lm else MASKED_LM_STRATEGIES if is_masked_lm(pre.model)
               else ENCODER_DECODER_STRATEGIES)
    strategy = allowed[0] if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy not in allowed:
        raise ConfigError(f"strategy {strategy!r} does not apply to {pre.model.kind} models "
                          f"(use {' or '.join(allowed)})")
    wildtype = check_wildtype(wildtype)
    parsed = parse_variants(wildtype, variants, first_index)
    if strategy == "llr":  # each distinct sequence scored once, the wild type among them
        seqs = sorted({v.apply(wildtype) for v in parsed} | {wildtype})
        ll = dict(zip(seqs, causal.log_likelihoods(pre, seqs, token_budget=token_budget)))
        return np.array([ll[v.apply(wildtype)] - ll[wildtype] for v in parsed], dtype=np.float64)
    if strategy == "joint":
        return _joint_scores(pre, wildtype, parsed, token_budget)
    positions = sorted({p for v in parsed for p in v.positions})
    table = _marginal_table(pre, wildtype, positions, token_budget, strategy)
    row = {p: i for i, p in enumerate(table.positions)}
    col = {aa: j for j, aa in enumerate(table.alphabet)}
    lp = table.log_probs
    return np.array([sum(lp[row[m.position], col[m.mut]] - lp[row[m.position], col[m.wt]] for m in v.mutations)
                     for v in parsed], dtype=np.float64)


def _broadcast_cache(cache, n: int):
    """A view of a batch-1 cache as n rows (expand, no copy); the original is left untouched."""
    layers = []
    for layer in cache.layers:
        fields = {k: (None if t is None else t.expand(n, *t.shape[1:])) for k, t in vars(layer).items()}
        layers.append(type(layer)(**fields))
    return type(cache)(layers)


def _joint_scores(pre, wildtype: str, variants: list[Variant], token_budget: int) -> np.ndarray:
    """Group variants by their position set: one encoder pass per group, teacher-forced decoder rows."""
    model, tok = pre.model, pre.tokenizer
    require_decoder(model)
    device = model_device(model)
    start = model.config.decoder_start_token_id
    scores = np.zeros(len(variants))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(variants):
        if v.mutations:
            groups.setdefault(v.positions, []).append(i)
    with torch.inference_mode():
        for positions, members in groups.items():
            template = list(wildtype)
            for p in positions:
                template[p] = "?"
            enc_ids = torch.as_tensor([denoising_input(tok, "".join(template), "wild type")], device=device)
            enc = model.encode(enc_ids, torch.ones_like(enc_ids)).last_hidden_state
            # row 0 is the wild type; the decoder sees <start> s0 r0 s1 r1 ... s_{m-1} and predicts r_k after s_k
            residue_rows = [[wildtype[p] for p in positions]] + [[m.mut for m in variants[i].mutations] for i in members]
            targets = torch.as_tensor([[tok.residue_ids[aa] for aa in row] for row in residue_rows], device=device)
            sentinels = torch.as_tensor(tok.sentinel_ids[:len(positions)], device=device)
            dec = torch.empty((len(residue_rows), 2 * len(positions)), dtype=torch.long, device=device)
            dec[:, 0] = start
            dec[:, 1::2] = sentinels
            dec[:, 2::2] = targets[:, :-1]
            enc_mask = torch.ones_like(enc_ids)
            # Every row shares the encoder output, so the cross-attention keys/values and the start token's
            # state are computed once (batch of 1) and the cache is then replicated across the rows.
            shared = model.new_cache()
            model.decode(dec[:1, :1], enc, enc_mask, cache=shared)
            totals = []
            step = _rows_per_batch(dec.shape[1] + enc_ids.shape[1], token_budget)
            for lo in range(0, len(dec), step):
                d = dec[lo:lo + step, 1:]
                cache = _broadcast_cache(shared, len(d))
                h = model.decode(d, enc.expand(len(d), -1, -1), enc_mask.expand(len(d), -1), cache=cache)
                lp = model.lm_logits(h.last_hidden_state[:, 0::2]).float().log_softmax(-1)  # (n, m, V) after each sentinel
                totals.append(lp.gather(2, targets[lo:lo + step, :, None])[..., 0].sum(1).cpu())
            total = torch.cat(totals).numpy().astype(np.float64)
            scores[members] = total[1:] - total[0]
    return scores
