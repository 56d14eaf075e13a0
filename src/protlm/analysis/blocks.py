"""Running one stack block by block, so an analysis can read, replace or skip any layer.

``Stack.forward`` runs all blocks in one go. The depth analyses need more control: start from a stored residual
stream, skip a block (its output := its input), read the update each sublayer adds, or stop early. This module
does that through the parts of the stack protocol (:mod:`protlm.model.protocol`: ``embed``, ``block``,
``final_layer_norm``, ``self_mask``), so the arithmetic is the model's, whatever its family;
``tests/test_analysis.py`` (T5) and ``tests/test_analysis_esm.py`` (ESM) check that a plain run here equals
``model.encode`` / ``model.decode`` exactly.

Layer numbering: h[0] is the embedding output and h[l] the residual stream after block l (1-based), *before* the
final norm. ``normed(h[l])`` is what a model truncated after block l would output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from protlm.model.protocol import BlockOutput


@dataclass
class StackMasks:
    """The additive masks one batch needs; built once and shared by every block and every perturbed run."""

    self_mask: object  # the stack's per-batch context (T5: position bias + padding (+ causality) as one tensor)
    cross_mask: Tensor | None = None  # decoder only: (B, 1, 1, Le), 0 on encoder tokens, -inf-like on padding


class StackRunner:
    """Block-by-block execution of an encoder or decoder stack in eval mode."""

    def __init__(self, stack: nn.Module):
        self.stack = stack
        self.n_layers = stack.n_layers
        self.is_decoder = stack.is_decoder

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """h[0]. The mask matters to ESM (padding is zeroed, token dropout counts real tokens); T5 ignores it."""
        return self.stack.embed(input_ids, attention_mask)

    def masks(self, h: Tensor, attention_mask: Tensor | None, encoder_mask: Tensor | None = None) -> StackMasks:
        """Masks for a stream ``h`` (B, L, D); the decoder's own padding needs no mask (it is causally last)."""
        q_len = h.shape[1]
        self_mask = self.stack.self_mask(attention_mask, q_len, q_len, 0, h.dtype)
        cross = None
        if self.is_decoder:
            if encoder_mask is None:
                raise ValueError("a decoder run needs the encoder's attention mask")
            cross = self.stack.cross_mask(encoder_mask.to(h.device), h.dtype)
        return StackMasks(self_mask, cross)

    def block(self, layer: int, h: Tensor, masks: StackMasks, enc: Tensor | None = None,
              updates: bool = False) -> BlockOutput:
        """Apply block ``layer`` (1-based) to the stream entering it."""
        if not 1 <= layer <= self.n_layers:
            raise IndexError(f"block {layer} out of 1..{self.n_layers}")
        return self.stack.block[layer - 1](h, masks.self_mask, enc, masks.cross_mask, None, return_updates=updates)

    def run(self, h: Tensor, masks: StackMasks, start: int, enc: Tensor | None = None,
            skip: int | None = None) -> list[Tensor]:
        """Streams after blocks start+1..N, starting from ``h`` = the stream after block ``start``.

        ``skip`` names a block that passes its input through unchanged. Returns N - start tensors: entry i is
        the stream after block start+1+i.
        """
        out = []
        for layer in range(start + 1, self.n_layers + 1):
            if layer != skip:
                h = self.block(layer, h, masks, enc).hidden
            out.append(h)
        return out

    def normed(self, h: Tensor) -> Tensor:
        return self.stack.final_layer_norm(h)
