"""Generation and zero-shot scoring with T5 protein models: completion, infilling, variant effects.

- :func:`generate` completes prefixes (Ankh3's ``[S2S]`` task), greedy, sampled or by beam search;
- :func:`infill` fills masked positions through the denoising sentinels (``[NLU]`` task);
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
