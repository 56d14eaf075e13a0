"""Controlled pretraining ablations: matched variants, equal token budgets, several seeds, one report.

- :mod:`~protlm.ablate.recipe`: the recipe YAML (base config + per-variant objective overrides + seeds + budget
  + evaluation profile) and each (variant, seed)'s resolved pretraining config;
- :mod:`~protlm.ablate.plan`: every check made before compute (matched variants, reachable budget, evaluation
  splits, depth input);
- :mod:`~protlm.ablate.run`: the stages (pretrain, evaluate, depth, report) with a resumable state file;
- :mod:`~protlm.ablate.stats`: the paired bootstrap over test proteins;
- :mod:`~protlm.ablate.report`: the Table-5-shaped report, curves and verdict.
"""

from protlm.ablate.plan import AblationPlan, check_plan
from protlm.ablate.recipe import AblationRecipe, load_recipe, variant_config
from protlm.ablate.run import run_ablation
from protlm.ablate.stats import PairedDifference, paired_bootstrap

__all__ = ["AblationRecipe", "load_recipe", "variant_config", "AblationPlan", "check_plan", "run_ablation",
           "PairedDifference", "paired_bootstrap"]
