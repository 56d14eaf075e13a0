"""Generation and zero-shot scoring: completion, infilling, variant effects.

T5 models (encoder-decoder) go through their decoder; masked-LM models (ESM-2, DPLM) through their LM head at
``<mask>`` positions (:mod:`protlm.generation.masked`).

- :func:`generate` completes prefixes (Ankh3's ``[S2S]`` task), greedy, sampled or by beam search (T5 only);
- :func:`infill` fills masked positions: through the denoising sentinels (T5, ``[NLU]`` task) or the LM head;
- :func:`score_variants`, :func:`masked_marginals` and :func:`pseudo_log_likelihood` score sequences zero-shot;
- :func:`blosum62_scores` is the substitution-matrix baseline.
"""

from __future__ import annotations

from protlm.generation.blosum import blosum62_scores
from protlm.generation.completion import Completion, GenerationConfig, generate, to_fasta
from protlm.generation.infilling import Infilled, MaskedSequence, infill, mask_positions, parse_masked
from protlm.generation.mutations import Mutation, Variant, parse_variant, variant_from_sequence
from protlm.generation.scoring import MarginalTable, masked_marginals, pseudo_log_likelihood, score_variants

__all__ = [
    "generate", "GenerationConfig", "Completion", "to_fasta",
    "infill", "Infilled", "MaskedSequence", "parse_masked", "mask_positions",
    "score_variants", "masked_marginals", "pseudo_log_likelihood", "MarginalTable", "blosum62_scores",
    "Mutation", "Variant", "parse_variant", "variant_from_sequence",
]
