"""Loss curves of a run as a PNG, from its ``metrics.jsonl`` (the trainer redraws it after every validation).

Left: training loss per task over all target tokens. Right: validation loss per task over the residue tokens of
the targets, against the unigram (residue frequency) baseline of the same tokens, the loss a model would reach
by knowing only the composition of proteins.
"""

from __future__ import annotations

import os

from protlm.objectives import TASKS
from protlm.train.metrics import read_metrics
from protlm.utils import pyplot, save_figure

COLORS = {"denoise": "tab:blue", "complete": "tab:orange", "all": "tab:gray"}
LABELS = {"denoise": "denoise [NLU]", "complete": "complete [S2S]", "all": "all"}


def plot_curves(metrics_path: str, png_path: str, title: str | None = None) -> str:
    records = read_metrics(metrics_path)
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for task in TASKS:
        pts = [(r["step"], r[f"train/{task}/loss"]) for r in records if r.get(f"train/{task}/loss") is not None]
        if pts:
            left.plot(*zip(*pts), color=COLORS[task], lw=1, label=LABELS[task])
        pts = [(r["step"], r[f"val/{task}/residue_loss"]) for r in records if r.get(f"val/{task}/residue_loss") is not None]
        if pts:
            right.plot(*zip(*pts), "o-", color=COLORS[task], ms=3, label=f"{LABELS[task]}")
        base = [(r["step"], r[f"val/{task}/unigram_loss"]) for r in records if r.get(f"val/{task}/unigram_loss") is not None]
        if base:
            right.axhline(base[-1][1], color=COLORS[task], ls="--", lw=1, label=f"unigram baseline ({task})")
        comp = [r[f"val/{task}/composition_loss"] for r in records if r.get(f"val/{task}/composition_loss") is not None]
        if comp:
            right.axhline(comp[-1], color=COLORS[task], ls=":", lw=1, label=f"own-composition baseline ({task})")
    left.set(xlabel="step", ylabel="cross-entropy (nats / target token)", title="training loss", yscale="log")
    right.set(xlabel="step", ylabel="cross-entropy (nats / residue)", title="validation loss on target residues")
    finite = [r[f"val/{t}/residue_loss"] for r in records for t in TASKS if r.get(f"val/{t}/residue_loss") is not None]
    bases = [r[f"val/{t}/unigram_loss"] for r in records for t in TASKS if r.get(f"val/{t}/unigram_loss") is not None]
    if finite and bases:
        lo = min(finite + bases)
        # zoomed on the baseline: a fresh model's first evaluations (near ln 256) would flatten the rest
        right.set_ylim(lo - 0.05, max(bases) + 0.12)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=110, format="png")


if __name__ == "__main__":  # python -m protlm.train.plot RUN_DIR
    import sys

    run = sys.argv[1]
    print(plot_curves(os.path.join(run, "metrics.jsonl"), os.path.join(run, "curves.png"), title=run))
