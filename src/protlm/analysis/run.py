"""A depth analysis run into an output directory, resumable: the one path behind ``protlm analyze depth``, the
demo's depth stage and the ablation's depth stage."""

from __future__ import annotations

import os

from protlm.analysis.depth import DepthOptions, DepthReport, analyze_depth
from protlm.analysis.truncate import check_cut
from protlm.analysis.write import resolve_truncation, write_depth_outputs

STATE_FILE = ".depth-state.pt"


def run_depth_analysis(pretrained, input_path: str, out_dir: str, options: DepthOptions | None = None, *,
                       max_proteins: int | None = None, progress: bool = False,
                       truncate_at: str | int | None = None) -> tuple[DepthReport, dict[str, str]]:
    """Analyse ``pretrained`` on ``input_path`` and write the report into ``out_dir`` (:func:`write_depth_outputs`);
    returns the report and name -> path of every file written.

    Finished batches are kept in ``out_dir/.depth-state.pt`` meanwhile, so the same call after an interruption
    resumes; the file is removed once the outputs are written.
    """
    if truncate_at not in (None, "auto"):  # a bad cut point fails before the (long) analysis
        check_cut(pretrained.model.encoder.n_layers, resolve_truncation(None, truncate_at))
    state = os.path.join(out_dir, STATE_FILE)
    report = analyze_depth(pretrained, input_path, options, max_proteins=max_proteins, progress=progress,
                           state_path=state)
    written = write_depth_outputs(report, out_dir, pretrained, truncate_at)
    if os.path.exists(state):
        os.unlink(state)
    return report, written
