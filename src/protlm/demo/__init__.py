"""``protlm demo``: pretrain, embed, evaluate, analyse and generate on real proteins bundled with protlm, in one
resumable command that ends with ``DIR/report.md``."""

from protlm.demo.pipeline import STAGES, DemoOptions, DemoResult, run_demo

__all__ = ["STAGES", "DemoOptions", "DemoResult", "run_demo"]
