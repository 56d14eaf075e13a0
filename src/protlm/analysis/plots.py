"""PNG figures of a depth report (matplotlib, headless). One file per analysis, one row per stack."""

from __future__ import annotations

import os

import numpy as np

from protlm.utils import pyplot, save_figure

PNG = dict(format="png", dpi=110, bbox_inches="tight")


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _auto_scale(ax, values: np.ndarray) -> None:
    """Log scale when the positive values span more than two decades (zeros are then not drawn), else linear
    from 0, with plain tick labels either way."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size > 1 and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0, top=max(float(positive.max()) * 1.08, 1e-6) if positive.size else 1)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _stacks(report):
    return [r for r in (report.encoder, report.decoder) if r is not None]


def plot_contribution(report, path: str) -> str | None:
    stacks = [r for r in _stacks(report) if r.contribution is not None]
    if not stacks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(stacks), 2, figsize=(11, 3.8 * len(stacks)), squeeze=False, constrained_layout=True)
    for row, rep in zip(axes, stacks):
        co = rep.contribution
        x = np.asarray(co.layers)
        series = [("attention", co.attn_rel, co.attn_cos), ("cross-attention", co.cross_rel, co.cross_cos),
                  ("FFN", co.ffn_rel, co.ffn_cos), ("whole layer Δ", co.layer_rel, co.layer_cos)]
        for label, rel, cos in series:
            if rel is None:
                continue
            style = dict(marker="o", ms=3, lw=2.2 if label.startswith("whole") else 1.3, label=label)
            row[0].errorbar(x, _arr(rel.mean), yerr=_arr(rel.std), capsize=2, **style)
            row[1].errorbar(x, _arr(cos.mean), yerr=_arr(cos.std), capsize=2, **style)
        _auto_scale(row[0], np.concatenate([_arr(r.mean) for _, r, _ in series if r is not None]))
        row[0].set_ylabel("‖update‖ / ‖h‖")
        row[0].set_title(f"{rep.stack}: relative size of each update")
        row[1].axhline(0, color="grey", lw=0.8)
        row[1].set_ylabel("cos(update, h)")
        row[1].set_title(f"{rep.stack}: direction of each update")
        for ax in row:
            ax.set_xlabel("block")
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"Contribution to the residual stream — {report.model['source']}", fontsize=10)
    return save_figure(fig, path, **PNG)


def _skip_sample_note(cmp) -> str:
    """How many proteins the runs' skip measures average over, when that is a sample (``--skip-proteins``)."""
    from protlm.analysis.compare import skip_sample_sizes

    n_all, counts = skip_sample_sizes(cmp)
    if len(set(counts)) > 1:
        return "\n(over different protein samples: " + ", ".join(
            f"{r.label} {k}" for r, k in zip(cmp.runs, counts)) + ")"
    return f"\n({counts[0]} of the {n_all} proteins)" if counts[0] and counts[0] < n_all else ""


def plot_skip(report, path: str) -> str | None:
    stacks = [r for r in _stacks(report) if r.skip is not None and r.skip.skipped]
    if not stacks:
        return None
    plt = pyplot()
    from matplotlib.colors import LogNorm, Normalize

    fig, axes = plt.subplots(len(stacks), 2, figsize=(13, 4.6 * len(stacks)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.25, 1]}, constrained_layout=True)
    for row, rep in zip(axes, stacks):
        sk = rep.skip
        m = np.array([_arr(r) for r in sk.hidden_change])
        positive = m[np.isfinite(m) & (m > 0)]
        if positive.size and positive.max() / positive.min() > 30:  # spans decades: a log colour scale
            norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        else:
            norm = Normalize(vmin=0, vmax=positive.max() if positive.size else 1)
        im = row[0].imshow(np.where(np.isfinite(m), m, np.nan), aspect="auto", cmap="magma", norm=norm)
        if m.size <= 400:
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    bright = norm(v) > 0.6 if v > 0 or not isinstance(norm, LogNorm) else False
                    row[0].text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                                color="black" if bright else "white")
        row[0].set_xticks(range(len(sk.later_layers)), sk.later_layers)
        row[0].set_yticks(range(len(sk.skipped)), sk.skipped)
        row[0].set_xlabel("later stream m (after block m)")
        row[0].set_ylabel("skipped block l")
        row[0].set_title(f"{rep.stack}: ‖h'_m − h_m‖ / ‖h_m‖ after removing block l", fontsize=10)
        fig.colorbar(im, ax=row[0], fraction=0.046)
        ax = row[1]
        x = np.asarray(sk.skipped)
        if sk.output_top1_agreement is not None:
            flip = 1 - _arr(sk.output_top1_agreement.mean)
            ax.bar(x, flip, color="tab:red", alpha=0.75, label="top-1 changed")
            ax.set_ylabel("share of predictions whose top-1 changes", color="tab:red")
            ax.axhline(report.options["flip_threshold"], color="tab:red", ls=":", lw=1)
            ax2 = ax.twinx()
            kl = _arr(sk.output_kl.mean)
            ax2.plot(x, kl, "o-", color="tab:blue", label="KL(full‖skipped)")
            _auto_scale(ax2, kl)
            ax2.set_ylabel("KL(full ‖ skipped), nats", color="tab:blue")
            ax.set_title(f"{rep.stack}: change of the output distribution")
        else:
            ax.bar(x, m[:, -1], color="tab:purple")
            ax.set_ylabel("relative change of the last stream")
            head = "LM head" if report.model.get("kind") in ("masked-lm", "causal-lm") else "decoder"
            ax.set_title(f"{rep.stack}: change of the final stream (no {head}: no output measure)")
        ax.set_xlabel("skipped block l")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    n_all, k = report.inputs["n_proteins"], stacks[0].skip.n_proteins
    over = f" (means over a seeded sample of {k} of the {n_all} proteins)" if 0 < k < n_all else ""
    fig.suptitle(f"Layer skipping — {report.model['source']}{over}", fontsize=10)
    return save_figure(fig, path, **PNG)


def plot_early_exit(report, path: str) -> str | None:
    stacks = [r for r in _stacks(report) if r.early_exit is not None]
    if not stacks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stacks), figsize=(6.5 * len(stacks), 4.2), squeeze=False, constrained_layout=True)
    for ax, rep in zip(axes[0], stacks):
        ee = rep.early_exit
        x = np.asarray(ee.layers)
        ax.plot(x, _arr(ee.top1_agreement.mean), "o-", color="tab:green", label="top-1 agreement with full")
        ax.plot(x, _arr(ee.accuracy.mean), "s--", color="tab:grey", ms=3, label="accuracy on true residues")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("share of masked-residue predictions")
        ax2 = ax.twinx()
        kl = _arr(ee.kl.mean)
        ax2.plot(x, kl, "^-", color="tab:blue", label="KL(full‖exit)")
        _auto_scale(ax2, kl)
        ax2.set_ylabel("KL(full ‖ exit), nats", color="tab:blue")
        kind = "early exit into the decoder" if rep.stack == "encoder" else "logit lens"
        if rep.stack == "encoder" and report.model.get("output") == "lm-head":
            kind = "logit lens (final norm → LM head)"
        ax.set_title(f"{rep.stack}: {kind}")
        ax.set_xlabel("layer l")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.suptitle(f"Early exit — {report.model['source']}", fontsize=10)
    return save_figure(fig, path, **PNG)


def plot_probe(report, path: str) -> str | None:
    pr = report.encoder.probe
    if pr is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.plot(pr.layers, pr.score, "o-", label=f"{pr.task} Q3 (linear probe)")
    ax.axhline(pr.majority_baseline, color="grey", ls=":", label="majority class")
    ax.axhline(0.95 * pr.best_score, color="tab:orange", ls="--", lw=1, label="95% of best")
    ax.axvline(pr.layer_95, color="tab:orange", lw=1)
    ax.set_xlabel("encoder layer (after final norm)")
    ax.set_ylabel("Q3 on test residues")
    ax.set_xticks(pr.layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-layer probe — {report.model['source']}", fontsize=10)
    return save_figure(fig, path, **PNG)


def plot_cka(report, path: str) -> str | None:
    stacks = [r for r in _stacks(report) if r.similarity is not None]
    if not stacks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stacks), figsize=(5.5 * len(stacks), 4.6), squeeze=False, constrained_layout=True)
    for ax, rep in zip(axes[0], stacks):
        sim = rep.similarity
        m = np.array(sim.cka, dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower")
        if m.size <= 400:
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
        ax.set_xticks(range(len(sim.layers)), sim.layers)
        ax.set_yticks(range(len(sim.layers)), sim.layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"{rep.stack}: linear CKA ({sim.n_tokens} tokens)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Cross-layer similarity — {report.model['source']}", fontsize=10)
    return save_figure(fig, path, **PNG)


def write_plots(report, out_dir: str) -> dict[str, str]:
    """Write every plot the report has data for; returns name -> file name (relative to out_dir)."""
    out = {}
    for name, fn in (("contribution", plot_contribution), ("skip", plot_skip), ("early_exit", plot_early_exit),
                     ("probe", plot_probe), ("cka", plot_cka)):
        path = fn(report, os.path.join(out_dir, f"{name}.png"))
        if path:
            out[name] = os.path.basename(path)
    return out


# --- depth across models (protlm analyze depth --compare) --------------------------------------------------------
# One line style per objective, one colour per model: a reader can tell objectives apart in grey print too.
OBJECTIVE_STYLE = {"masked": "-", "diffusion": "--", "autoregressive": "-.", "encoder-decoder denoising": ":"}


def plot_compare(cmp, path: str) -> str | None:
    """One panel per measure of :data:`protlm.analysis.compare.MEASURES` against relative depth l/N, one curve per
    run (its encoder stack); a run without a measure is named under that panel instead of drawn."""
    from protlm.analysis.compare import MEASURES

    if not cmp.rows:
        return None
    plt = pyplot()
    ncols = 3
    nrows = -(-len(MEASURES) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False, constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for ax, (measure, title, _) in zip(axes.flat, MEASURES):
        values, absent = [], []
        for i, run in enumerate(cmp.runs):
            pts = [(row["relative_depth"], row[measure]) for row in cmp.rows
                   if row["model"] == run.label and row["stack"] == "encoder" and row[measure] is not None]
            if not pts:
                absent.append(f"{run.label}: {run.missing.get(measure, 'no values')}")
                continue
            x, y = zip(*pts)
            values += y
            weights = "random init" if run.model.get("random_init") else "trained"
            label = f"{run.label} — {run.objective} ({weights})"
            (line,) = ax.plot(x, y, OBJECTIVE_STYLE.get(run.objective, "-"), marker="o", ms=3, lw=1.6,
                              color=colours[i % len(colours)], label=label)
            handles.setdefault(label, line)
        if measure in ("layer_rel", "skip_kl"):
            _auto_scale(ax, np.asarray(values, dtype=float))
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(-0.02, 1.02)
        # under the axis, where it never hides a curve
        ax.set_xlabel("relative depth l / N" + "".join(f"\nnot drawn: {a}" for a in absent),
                      fontsize=None if not absent else 8)
        ax.set_title(title + (_skip_sample_note(cmp) if measure.startswith("skip") else ""), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(MEASURES):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 2),
               fontsize=8, frameon=False)
    inp = cmp.runs[0].data["inputs"]
    fig.suptitle(f"Depth across models: {inp.get('n_proteins')} proteins from {os.path.basename(str(inp.get('path')))}"
                 " (encoder stack; T5: encoder, exits into its decoder)", fontsize=10)
    return save_figure(fig, path, **PNG)
