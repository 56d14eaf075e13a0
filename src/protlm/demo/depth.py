"""Stage 4: the depth analysis (``protlm analyze depth``) of the pretrained model on held-out proteins, with
per-layer secondary-structure probes trained on the bundled FLIP split. Resumable through the analysis' own
state file."""

from __future__ import annotations

import os

from protlm.analysis import DepthOptions, run_depth_analysis
from protlm.convert import load
from protlm.demo.bundle import PROBE_DATA, bundled, held_out_proteins_file


def depth_options(quick: bool) -> tuple[DepthOptions, int]:
    """(options, proteins analysed); the quick profile is a smoke test."""
    if quick:
        return DepthOptions(max_length=64, probe_data=bundled(PROBE_DATA), probe_train=6, probe_test=4,
                            cka_tokens=512), 6
    # the demo model's training crop is 128 tokens; ~20 CPU-seconds for the tiny model
    return DepthOptions(max_length=128, probe_data=bundled(PROBE_DATA), probe_train=500, probe_test=200), 200


def run_depth(final_dir: str, out_dir: str, quick: bool, progress: bool) -> dict:
    """Writes depth.json, depth.md and PNGs into ``out_dir``; returns the facts the report quotes."""
    options, n = depth_options(quick)
    report, written = run_depth_analysis(load(final_dir), held_out_proteins_file(), out_dir, options, max_proteins=n,
                                         progress=progress)
    pngs = {k: os.path.relpath(v, out_dir) for k, v in written.items() if v.endswith(".png")}
    return {"summary": report.summary, "plots": pngs, "markdown": os.path.relpath(written["markdown"], out_dir),
            "proteins": n}
