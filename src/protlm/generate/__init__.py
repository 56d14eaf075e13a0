"""Generation and zero-shot scoring with T5 protein models: completion, infilling, variant effects.

- :func:`generate` completes prefixes (Ankh3's ``[S2S]`` task), greedy, sampled or by beam search;
- :func:`infill` fills masked positions through the denoising sentinels (``[NLU]`` task);
- :func:`score_variants`, :func:`masked_marginals` and :func:`pseudo_log_likelihood` score sequences zero-shot;
- :func:`blosum62_scores` is the substitution-matrix baseline.
"""

from __future__ import annotations

import sys
import types

from protlm.generate.blosum import blosum62_scores
from protlm.generate.completion import Completion, GenerationConfig, generate, to_fasta
from protlm.generate.infilling import Infilled, MaskedSequence, infill, mask_positions, parse_masked
from protlm.generate.mutations import Mutation, Variant, parse_variant, variant_from_sequence
from protlm.generate.scoring import MarginalTable, masked_marginals, pseudo_log_likelihood, score_variants


class _CallablePackage(types.ModuleType):
    """``protlm.generate`` is both this package and the top-level API function ``protlm.generate(...)``.

    Importing a subpackage rebinds the parent's attribute of the same name to the module, which would replace
    the function defined in ``protlm/__init__.py``. Making the package callable keeps ``protlm.generate(pre,
    "MKT...")`` working whichever of the two the name currently points at.
    """

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "generate", "GenerationConfig", "Completion", "to_fasta",
    "infill", "Infilled", "MaskedSequence", "parse_masked", "mask_positions",
    "score_variants", "masked_marginals", "pseudo_log_likelihood", "MarginalTable", "blosum62_scores",
    "Mutation", "Variant", "parse_variant", "variant_from_sequence",
]
