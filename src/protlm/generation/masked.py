"""Zero-shot scores and infilling with masked-LM models (ESM-2, DPLM: ``model.kind == "masked-lm"``).

The model reads ``<cls> residues <eos>`` with ``<mask>`` at the positions in question, and its LM head predicts
each of them from both sides in one forward pass. Every function here is built on :func:`residue_logits`, which
runs a list of windows through the model in length-sorted batches of at most ``token_budget`` tokens (padding
included) and returns the logits at the positions each window asks for.

Definitions (Meier et al., NeurIPS 2021; fair-esm ``examples/variant-prediction/predict.py``; ProteinGym):

- masked marginal: mask position i of the wild type alone; log p(x_i = mt) - log p(x_i = wt) from that pass;
  a multi-mutant sums over its mutations. One pass per distinct mutated position (the passes are batched).
- wt marginal: one pass on the unmasked wild type; the same difference read at each position of that pass.
- pseudo-log-likelihood: sum over i of log p(x_i = true residue) with position i masked alone.

Probabilities are over the 20 standard residues only (the softmax is restricted to their logits, so specials,
``<mask>``, X/B/U/Z/O and the gap tokens ``.``/``-`` can never be predicted). A masked or wt marginal is a
difference of two log-probabilities at one position, so it equals fair-esm's full-vocabulary number exactly;
a pseudo-log-likelihood is slightly higher than the full-vocabulary one, and a sequence holding a non-standard
residue cannot be given one (that is refused, naming the position).

Long sequences (more than ``model.max_residues`` residues, 1022 for ESM-2): fair-esm feeds them whole; here each
position is predicted inside a window of ``max_residues`` residues, as ProteinGym does. With a mask (masked
marginal, PLL) the window is centred on the position and shifted to stay inside the sequence. The wt marginal
reads windows that start every ``max_residues // 2`` residues (the last one ending at the sequence's end), each
position from the window where it lies farthest from an edge, so a scan of a long protein costs a few passes.
Infilling fills every masked position of one window together, so longer inputs are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protlm.errors import ConfigError, InputError
from protlm.generation.mutations import STANDARD_RESIDUES
from protlm.generation.tokens import model_device

DEFAULT_TOKEN_BUDGET = 16384  # tokens per forward pass, padding included


@dataclass
class Window:
    """One model input: residue ids (``<mask>`` ids already placed) and the indices whose predictions are wanted."""

    ids: np.ndarray  # (n,) token ids of the residues, no <cls>/<eos>
    read: list[int]  # 0-based indices into ``ids``


def require_lm_head(model) -> None:
    if getattr(model, "lm_head", None) is None:
        raise ConfigError("this masked-LM model was loaded without its LM head (an EsmModel checkpoint or "
                          "encoder-only); scoring and infilling need EsmForMaskedLM weights")


def mask_id(tokenizer) -> int:
    if tokenizer.mask_id is None:
        raise ConfigError(f"the vocabulary ({tokenizer.source}) has no <mask> token; a masked-LM needs one")
    return tokenizer.mask_id


def residue_columns(tokenizer) -> list[int]:
    """Token ids of the 20 standard residues, in the order of ``STANDARD_RESIDUES``."""
    return [tokenizer.residue_ids[aa] for aa in STANDARD_RESIDUES]


def centred_start(length: int, position: int, width: int | None) -> int:
    """First residue of the ``width``-residue window centred on ``position``, kept inside the sequence."""
    if width is None or length <= width:
        return 0
    return min(max(0, position - width // 2), length - width)


def tiled_starts(length: int, positions: list[int], width: int | None) -> list[int]:
    """For each position, the start of the half-overlapping tile that holds it farthest from an edge."""
    if width is None or length <= width:
        return [0] * len(positions)
    starts = sorted(set(range(0, length - width, max(1, width // 2))) | {length - width})
    return [max(starts, key=lambda s: min(p - s, s + width - 1 - p)) for p in positions]


def residue_logits(pre, windows: list[Window], token_budget: int) -> list[torch.Tensor]:
    """Vocabulary logits (fp32, CPU) at each window's ``read`` indices: one (len(read), V) tensor per window.

    Windows are run shortest first, as many per batch as ``token_budget`` allows for the batch's padded width.
    Padding cannot change a row's numbers (the padding keys are masked, and ESM's token-dropout scale counts
    each row's own length), so the results do not depend on the batching.
    """
    model, tok = pre.model, pre.tokenizer
    require_lm_head(model)
    device = model_device(model)
    head = tok.prefix_token_ids(None)  # [<cls>]
    out: list[torch.Tensor | None] = [None] * len(windows)

    def run(batch: list[int]) -> None:
        rows = [np.concatenate([head, windows[k].ids, [tok.eos_id]]).astype(np.int64) for k in batch]
        enc = tok.pad(rows)
        h = model.encode(enc.input_ids.to(device), enc.attention_mask.to(device)).last_hidden_state
        row = torch.as_tensor([r for r, k in enumerate(batch) for _ in windows[k].read], device=device)
        col = torch.as_tensor([len(head) + j for k in batch for j in windows[k].read], device=device)
        # the LM head acts on each position alone, so it only needs the positions that are read
        logits = model.mlm_logits(h[row, col]).float().cpu()
        for k, part in zip(batch, logits.split([len(windows[k].read) for k in batch])):
            out[k] = part

    with torch.inference_mode():
        batch: list[int] = []
        for k in sorted(range(len(windows)), key=lambda k: len(windows[k].ids)):
            width = len(windows[k].ids) + len(head) + 1  # the widest so far: the batch's padded width
            if batch and (len(batch) + 1) * width > token_budget:
                run(batch)
                batch = []
            batch.append(k)
        if batch:
            run(batch)
    return out  # type: ignore[return-value]


def _residue_logprobs(logits: torch.Tensor, tokenizer) -> torch.Tensor:
    """(n, 20) log-probabilities over the standard residues, from (n, V) vocabulary logits."""
    return logits[:, residue_columns(tokenizer)].log_softmax(-1)


def masked_marginal_logprobs(pre, wildtype: str, positions: list[int], token_budget: int) -> torch.Tensor:
    """(len(positions), 20): log p(residue) at each position with that position masked alone."""
    tok, width = pre.tokenizer, pre.model.max_residues
    ids = tok.residue_array(wildtype, record="wild type")
    mask = mask_id(tok)
    windows = []
    for p in positions:
        s = centred_start(len(ids), p, width)
        w = ids[s:s + width].copy() if width else ids.copy()
        w[p - s] = mask
        windows.append(Window(w, [p - s]))
    return _stack(residue_logits(pre, windows, token_budget), tok)


def wt_marginal_logprobs(pre, wildtype: str, positions: list[int], token_budget: int) -> torch.Tensor:
    """(len(positions), 20): log p(residue) at each position of the unmasked wild type."""
    tok, width = pre.tokenizer, pre.model.max_residues
    ids = tok.residue_array(wildtype, record="wild type")
    starts = tiled_starts(len(ids), positions, width)
    groups: dict[int, list[int]] = {}  # window start -> indices into positions
    for i, s in enumerate(starts):
        groups.setdefault(s, []).append(i)
    windows = [Window(ids[s:s + width] if width else ids, [positions[i] - s for i in members])
               for s, members in groups.items()]
    out = torch.empty(len(positions), len(STANDARD_RESIDUES))
    for members, logits in zip(groups.values(), residue_logits(pre, windows, token_budget)):
        out[members] = _residue_logprobs(logits, tok)
    return out


def pll_per_position(pre, records: list[tuple[str, str]], token_budget: int) -> list[np.ndarray]:
    """log p(x_i | the rest) at every position of each (id, sequence): one (L,) float64 array per record.

    The masked copies of all records are batched together (shortest first), so short proteins share passes.
    """
    tok, width = pre.tokenizer, pre.model.max_residues
    mask = mask_id(tok)
    windows, targets, counts = [], [], []
    for rid, seq in records:
        bad = next((i for i, c in enumerate(seq) if c not in STANDARD_RESIDUES), None)
        if bad is not None:
            raise InputError(f"{rid}: residue {seq[bad]!r} at position {bad + 1} is not one of the 20 standard "
                             "residues the pseudo-log-likelihood is computed over")
        ids = tok.residue_array(seq, record=rid)
        for p in range(len(ids)):
            s = centred_start(len(ids), p, width)
            w = ids[s:s + width].copy() if width else ids.copy()
            w[p - s] = mask
            windows.append(Window(w, [p - s]))
        targets.extend(STANDARD_RESIDUES.index(c) for c in seq)
        counts.append(len(seq))
    if not windows:
        return []
    lp = _stack(residue_logits(pre, windows, token_budget), tok)
    picked = lp[torch.arange(len(targets)), torch.as_tensor(targets)].numpy().astype(np.float64)
    return list(np.split(picked, np.cumsum(counts)[:-1]))


def _stack(parts: list[torch.Tensor], tokenizer) -> torch.Tensor:
    if not parts:
        return torch.empty(0, len(STANDARD_RESIDUES))
    return _residue_logprobs(torch.cat(parts), tokenizer)


def infill_logits(pre, inputs, token_budget: int) -> list[torch.Tensor]:
    """(n_masked, V) logits at the masked positions of each :class:`MaskedSequence`, all masked in one pass."""
    tok, width = pre.tokenizer, pre.model.max_residues
    mask = mask_id(tok)
    windows = []
    for m in inputs:
        if width is not None and len(m.template) > width:
            raise InputError(f"{m.id}: {len(m.template)} residues, more than the model's window of {width}; "
                             "infill a fragment that holds the masked positions")
        ids = tok.residue_array(m.template.replace("?", "A"), record=m.id).copy()  # "A": overwritten below
        ids[list(m.positions)] = mask
        windows.append(Window(ids, list(m.positions)))
    return residue_logits(pre, windows, token_budget)
