"""Depth analysis: which layers of a protein language model do the work.

``analyze_depth(pretrained, fasta, DepthOptions(...))`` returns a :class:`DepthReport`; ``write_depth_outputs``
writes it as JSON, PNG plots and a markdown summary; ``run_depth_analysis`` does both into a directory, resumably;
``truncate_encoder`` cuts an encoder after a chosen layer.
"""

from __future__ import annotations

from protlm.analysis.depth import ANALYSES, DepthOptions, DepthReport, analyze_depth
from protlm.analysis.run import run_depth_analysis
from protlm.analysis.truncate import truncate_encoder
from protlm.analysis.write import write_depth_outputs

__all__ = ["ANALYSES", "DepthOptions", "DepthReport", "analyze_depth", "run_depth_analysis", "truncate_encoder",
           "write_depth_outputs"]
