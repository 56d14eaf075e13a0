"""Downstream benchmarks with Ankh3's protocol: ConvBERT heads trained on frozen per-residue embeddings.

- :mod:`~protlm.evaluate.heads`: the ConvBERT head, one class for every task kind;
- :mod:`~protlm.evaluate.datasets`: readers for the benchmark files as users have them;
- :mod:`~protlm.evaluate.tasks`: labels -> numbers, splits, leave-one-out folds;
- :mod:`~protlm.evaluate.training`: the Table 4 training protocol and model selection;
- :mod:`~protlm.evaluate.metrics`: Q3/Q8, Q10/Q2, Spearman, contact precision;
- :mod:`~protlm.evaluate.embeddings`: one-hot, precomputed and model-embedded features;
- :mod:`~protlm.evaluate.suite`, :mod:`~protlm.evaluate.runner`, :mod:`~protlm.evaluate.report`: YAML suites,
  resumable runs, Table-5-shaped reports;
- :mod:`~protlm.evaluate.structure`: contacts and DSSP labels from PDB files.
"""

from protlm.evaluate.embeddings import DirectorySource, ModelSource, OneHotSource, FeatureSource
from protlm.evaluate.heads import KINDS, ConvBertHead, HeadConfig
from protlm.evaluate.report import write_report
from protlm.evaluate.runner import SuiteRun, export_fasta, run_suite
from protlm.evaluate.suite import Suite, load_suite, parse_suite
from protlm.evaluate.training import HeadTrainConfig, train_head

__all__ = [
    "ConvBertHead", "HeadConfig", "KINDS", "HeadTrainConfig", "train_head", "Suite", "load_suite", "parse_suite",
    "run_suite", "SuiteRun", "export_fasta", "write_report", "FeatureSource", "OneHotSource", "DirectorySource",
    "ModelSource",
]
