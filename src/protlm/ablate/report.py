"""The ablation report: a Table-5-shaped table (tasks x variants), the paired comparison with bootstrap
intervals, per-seed numbers, pretraining cost and curves, the depth comparison and a verdict written from the
numbers (``DIR/report.md``, ``DIR/results.json``, ``DIR/curves.png``; all written atomically)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protlm.ablate.plan import AblationPlan
from protlm.ablate.stats import PairedDifference, paired_bootstrap
from protlm.evaluate.metrics import mean_std
from protlm.train.metrics import read_metrics
from protlm.utils import atomic_write_text, pyplot, save_figure

TOKEN_RULE = ("A token is one non-padding position of the encoder input or of the decoder input, summed over both "
              "and over processes; every run stops at the first optimizer step that reaches the budget.")


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _mean_std(values: list[float]) -> str:
    m, s = mean_std(values)
    n = sum(1 for v in values if v is not None and math.isfinite(v))
    return "n/a" if not math.isfinite(m) else f"{m:.4f} ± {s:.4f} ({n})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _n_parameters(plan: AblationPlan) -> int:
    import torch

    from protlm.model.t5 import T5
    from protlm.tokenizer.vocab import protlm_tokenizer
    from protlm.train.trainer import build_model_config

    cfg = next(iter(plan.configs.values()))
    with torch.device("meta"):
        model = T5(build_model_config(cfg, protlm_tokenizer()))
    return sum(p.numel() for p in model.parameters())


# --- collecting ----------------------------------------------------------------------------------------------
@dataclass
class ResultRow:
    """One (task, test set, metric) line of the table: every value, by variant, pretraining seed, head seed."""

    task: str
    test: str
    metric: str
    primary: bool  # the task's first metric (the one compared)
    values: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)


@dataclass
class Comparison:
    task: str
    test: str
    metric: str
    diff: PairedDifference


def collect(plan: AblationPlan, evals) -> tuple[list[ResultRow], list[Comparison]]:
    """Rows of (task, test, metric) with every value per variant, and the paired differences."""
    r = plan.recipe
    by_model = {(e.variant, e.seed): e for e in evals}
    rows, diffs = [], []
    for task in plan.tasks:
        first = next((e.tasks[task] for e in evals if task in e.tasks), None)
        if first is None:
            continue
        for test, metrics in first["values"].items():
            for metric in first["metrics"]:
                if metric not in metrics:
                    continue
                row = ResultRow(task, test, metric, metric == first["metrics"][0])
                for v in r.variants:
                    per_seed = {}
                    for s in r.pretrain_seeds:
                        cell = by_model[(v, s)].tasks.get(task, {})
                        per_seed[s] = dict(zip(cell.get("seeds", []), cell.get("values", {}).get(test, {}).get(metric, [])))
                    row.values[v] = per_seed
                rows.append(row)
                if row.primary:
                    def models(variant: str) -> dict[tuple[int, int], list[dict]]:
                        out = {}
                        for s in r.pretrain_seeds:
                            cell = by_model[(variant, s)].tasks.get(task, {})
                            for hs, prot in cell.get("per_protein", {}).get(test, {}).items():
                                out[(s, int(hs))] = prot
                        return out

                    d = paired_bootstrap(first["kind"], metric, models(r.treatment), models(r.reference),
                                         (r.treatment, r.reference), r.stats.bootstrap, r.stats.confidence,
                                         r.stats.seed)
                    diffs.append(Comparison(task, test, metric, d))
    return rows, diffs


def _flat(per_seed: dict[int, dict[int, float]]) -> list[float]:
    return [v for by_head in per_seed.values() for v in by_head.values()]


# --- curves --------------------------------------------------------------------------------------------------
def plot_curves(plan: AblationPlan, path: str) -> None:
    plt = pyplot()
    r = plan.recipe
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for vi, v in enumerate(r.variants):
        for si, s in enumerate(r.pretrain_seeds):
            recs = read_metrics(os.path.join(plan.configs[(v, s)].output_dir, "metrics.jsonl"))
            train = [x for x in recs if "train/all/loss" in x and "train/tokens_seen" in x]
            if not train:
                continue
            steps = np.array([x["step"] for x in train], dtype=float)
            tokens = np.array([x["train/tokens_seen"] for x in train], dtype=float)
            style = dict(color=colours[vi % len(colours)], linestyle=styles[si % len(styles)], linewidth=1.2)
            axes[0].plot(tokens, [x["train/all/loss"] for x in train], label=f"{v} seed {s}", **style)
            val = [x for x in recs if x.get("val/denoise/loss") is not None]
            if val:
                vt = np.interp([x["step"] for x in val], steps, tokens)
                axes[1].plot(vt, [x["val/denoise/loss"] for x in val], marker="o", markersize=3,
                             label=f"{v} seed {s}", **style)
    axes[0].set_title("training loss (each variant's own task mix)")
    axes[1].set_title("validation denoising loss\n(held-out proteins, each variant's own masking rates)")
    for ax in axes:
        ax.set_xlabel("tokens through the model (encoder + decoder, no padding)")
        ax.set_ylabel("cross-entropy (nats per target token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"ablation {r.name}: pretraining curves")
    fig.tight_layout()
    save_figure(fig, path, format="png", dpi=110)


# --- depth ---------------------------------------------------------------------------------------------------
def depth_section(plan: AblationPlan, depth: dict[tuple[str, int], dict]) -> list[str]:
    r = plan.recipe
    if not depth:
        return []
    t, ref = r.treatment, r.reference
    lines = ["## Depth analysis: does multi-task training change how the layers are used?", "",
             f"`protlm analyze depth` on {t} and {ref} (pretraining seeds {plan.depth_seeds}), "
             f"{r.depth.max_proteins} proteins of `{r.depth.input}`. Per encoder layer: the linear-probe Q3 of the "
             "residual stream (SSP-3), the share of masked-residue predictions whose top-1 changes when that "
             "layer is skipped, and the layer's update size relative to the stream (‖Δ‖/‖h‖).", ""]
    for s in plan.depth_seeds:
        a, c = depth.get((ref, s)), depth.get((t, s))
        if a is None or c is None:
            continue
        header = ["encoder layer"]
        cols = []
        for name, rep in ((ref, a), (t, c)):
            enc = rep.get("encoder") or {}
            probe = enc.get("probe") or {}
            skip = enc.get("skip") or {}
            contrib = enc.get("contribution") or {}
            cols.append((name, dict(zip(probe.get("layers", []), probe.get("score", []))),
                         {l: (1 - ag if ag is not None else None) for l, ag in zip(
                             skip.get("skipped", []), ((skip.get("output_top1_agreement") or {}).get("mean") or []))},
                         dict(zip(contrib.get("layers", []), (contrib.get("layer_rel") or {}).get("mean", [])))))
        for name, *_ in cols:
            header += [f"{name} probe Q3", f"{name} skip flips", f"{name} ‖Δ‖/‖h‖"]
        layers = sorted({l for _, p, f, c_ in cols for l in list(p) + list(f) + list(c_)})
        rows = []
        for layer in layers:
            row = [str(layer)]
            for _, p, f, c_ in cols:
                row += [_fmt(p.get(layer), ".3f"), _fmt(f.get(layer), ".3f"), _fmt(c_.get(layer), ".3f")]
            rows.append(row)
        lines += [f"### Pretraining seed {s}", ""] + _table(header, rows) + [""]
        for name, rep in ((ref, a), (t, c)):
            fm = rep.get("full_model") or {}
            probe = (rep.get("encoder") or {}).get("probe") or {}
            facts = []
            if fm.get("denoising_accuracy") is not None:
                facts.append(f"denoising top-1 accuracy {_fmt(fm['denoising_accuracy'], '.3f')}")
            if probe.get("best_layer") is not None:
                facts.append(f"best probe layer {probe['best_layer']} (Q3 {_fmt(probe.get('best_score'), '.3f')}), "
                             f"95% of it at layer {probe.get('layer_95')}")
            lines += [f"- **{name}**: " + ("; ".join(facts) + ". " if facts else "") + (rep.get("summary") or ""), ""]
        lines += [f"Full pages: `depth/{ref}-seed{s}/depth.md`, `depth/{t}-seed{s}/depth.md`.", ""]
    return lines


# --- verdict -------------------------------------------------------------------------------------------------
def verdict(plan: AblationPlan, diffs: list[Comparison], n_params: int) -> str:
    r = plan.recipe
    t, ref = r.treatment, r.reference
    conf = f"{r.stats.confidence:.0%}"
    scale = (f"At this scale ({n_params / 1e6:.2f}M parameters, {r.token_budget:.3g} tokens per pretraining run, "
             f"{len(r.pretrain_seeds)} pretraining seeds x {len(plan.eval_seeds)} head seeds per variant)")
    usable = [d for d in diffs if math.isfinite(d.diff.estimate)]
    if not usable:
        return f"{scale} no paired comparison of {t} and {ref} could be computed (no per-protein results)."
    resolved = [d for d in usable if d.diff.reading.startswith(t)]
    higher = [d for d in resolved if d.diff.estimate > 0]
    lower = [d for d in resolved if d.diff.estimate < 0]
    split = [d for d in usable if d.diff.excludes_zero and not d.diff.seeds_agree]

    def name(d: Comparison) -> str:
        x = d.diff
        return (f"{d.task}/{d.test} ({d.metric} {x.estimate:+.4f}, {conf} CI "
                f"[{x.low:+.4f}, {x.high:+.4f}], n={x.n_proteins})")

    parts = [f"{scale}, {t} minus {ref} was compared on {len(usable)} test sets, with a {conf} percentile bootstrap "
             f"interval over test proteins."]
    if higher:
        parts.append(f"{t} scores higher on {len(higher)}: " + "; ".join(name(d) for d in higher) + ".")
    if lower:
        parts.append(f"{t} scores lower on {len(lower)}: " + "; ".join(name(d) for d in lower) + ".")
    if split:
        parts.append(f"On {len(split)} more the interval excludes zero but the pretraining seeds disagree in sign, "
                     "so they are not counted: " + "; ".join(name(d) for d in split) + ".")
    rest = len(usable) - len(resolved) - len(split)
    if rest:
        widest = max(max(abs(d.diff.low), abs(d.diff.high)) for d in usable
                     if not d.diff.excludes_zero) if any(not d.diff.excludes_zero for d in usable) else math.nan
        which = f"the other {rest}" if rest < len(usable) else ("the one" if rest == 1 else f"all {rest}")
        parts.append(f"On {which} the interval includes zero: these data neither show a difference nor rule "
                     f"one out (interval bounds reach ±{widest:.4f}).")
    if not resolved:
        parts.append(f"Overall, this run gives no resolved evidence that {t} beats {ref}"
                     + (", nor the reverse." if not lower else "."))
    elif higher and not lower:
        parts.append(f"Overall, the evidence favours {t} on the test sets listed, and only there.")
    elif lower and not higher:
        parts.append(f"Overall, the evidence favours {ref} on the test sets listed, and only there.")
    else:
        parts.append("Overall, the evidence is mixed across tasks.")
    parts.append(f"The intervals cover test-protein sampling only; variation between pretraining runs enters through "
                 f"{len(r.pretrain_seeds)} seeds (per-seed differences are listed above), which is too few to bound it.")
    if r.evaluation.quick:
        parts.append("The heads used the suite's quick profile (subsets, fewer epochs), not the paper's protocol.")
    return " ".join(parts)


# --- the page ------------------------------------------------------------------------------------------------
def write_report(plan: AblationPlan, state, evals, depth: dict, log=print) -> dict[str, Any]:
    r = plan.recipe
    out = r.output_dir
    rows, diffs = collect(plan, evals)
    n_params = _n_parameters(plan)
    curves = os.path.join(out, "curves.png")
    plot_curves(plan, curves)
    variants = list(r.variants)
    lines = [f"# Ablation: {r.name}", "",
             f"Recipe `{r.source}`, base config `{r.base_config}`; {n_params / 1e6:.2f}M-parameter model; "
             f"pretraining seeds {r.pretrain_seeds}; head seeds {plan.eval_seeds}; token budget "
             f"{r.token_budget:.4g} per run. {TOKEN_RULE}", "", "## Variants", ""]
    lines += _table(["variant", "description", "objective"], [
        [v, spec.description, ", ".join(f"{k}={json.dumps(val)}" for k, val in spec.set.items()) or "(base)"]
        for v, spec in r.variants.items()]) + [""]

    # Table 5 shape
    lines += ["## Results (Table 5 shape)", "",
              f"Mean ± std over {len(r.pretrain_seeds)} pretraining seeds x {len(plan.eval_seeds)} head seeds "
              "(number of values in brackets). Evaluation: "
              f"`{r.evaluation.suite}`{' --quick' if r.evaluation.quick else ''}, tasks {', '.join(plan.tasks)}.", ""]
    lines += _table(["task", "test set", "metric"] + variants,
                    [[x.task, x.test, x.metric] + [_mean_std(_flat(x.values[v])) for v in variants]
                     for x in rows]) + [""]
    if plan.skipped_tasks:
        lines += ["Not run (data not reachable): " + "; ".join(f"{k} ({v})" for k, v in plan.skipped_tasks.items()),
                  ""]

    # paired comparison
    t, ref = r.treatment, r.reference
    lines += [f"## Paired comparison: {t} − {ref}", "",
              f"Primary metric of each task. Δ = mean over {t}'s models − mean over {ref}'s, on the same test "
              f"proteins; {r.stats.confidence:.0%} percentile bootstrap interval over proteins "
              f"({r.stats.bootstrap} resamples, every model rescored on each resample).", ""]
    drows = []
    for d in diffs:
        x = d.diff
        drows.append([d.task, d.test, d.metric, _fmt(x.estimate, "+.4f"),
                      f"[{_fmt(x.low, '+.4f')}, {_fmt(x.high, '+.4f')}]", str(x.n_proteins),
                      ", ".join(f"seed {s}: {_fmt(v, '+.4f')}" for s, v in x.by_pretrain_seed.items()), x.reading])
    lines += _table(["task", "test set", "metric", "Δ", "CI", "proteins", "Δ per pretraining seed", "reading"],
                    drows) + [""]

    # per seed
    lines += ["## Every seed", "", "Primary metric per (variant, pretraining seed), one column per head seed.", ""]
    prow = []
    for x in rows:
        if not x.primary:
            continue
        for v in variants:
            for s in r.pretrain_seeds:
                by_head = x.values[v].get(s, {})
                prow.append([x.task, x.test, x.metric, v, str(s)]
                            + [_fmt(by_head.get(h)) for h in plan.eval_seeds])
    lines += _table(["task", "test set", "metric", "variant", "pretraining seed"]
                    + [f"head seed {h}" for h in plan.eval_seeds], prow) + [""]

    # pretraining
    lines += ["## Pretraining", "", "![pretraining curves](curves.png)", "",
              "Losses are over each variant's own targets (its masking rates and task mix, in training and in "
              "validation), so the curves show each run's progress, not a ranking of the variants.", ""]
    trows, pretrain = [], {}
    for (v, s), cfg in plan.configs.items():
        rec = state.stage(f"pretrain/{v}/seed{s}")
        recs = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
        last_train = next((x for x in reversed(recs) if "train/all/loss" in x), {})
        last_val = next((x for x in reversed(recs) if x.get("val/denoise/loss") is not None), {})
        pretrain[f"{v}-seed{s}"] = {"steps": rec.get("steps"), "tokens": rec.get("tokens"),
                                    "seconds": rec.get("seconds"), "train_loss": last_train.get("train/all/loss"),
                                    "val_denoise_loss": last_val.get("val/denoise/loss"),
                                    "val_complete_loss": last_val.get("val/complete/loss")}
        p = pretrain[f"{v}-seed{s}"]
        trows.append([v, str(s), str(p["steps"]), _fmt(p["tokens"] or math.nan, ".4g"),
                      _fmt(p["train_loss"] or math.nan), _fmt(p["val_denoise_loss"] or math.nan),
                      _fmt(p["val_complete_loss"] or math.nan), _fmt((p["seconds"] or math.nan) / 60, ".1f")])
    lines += _table(["variant", "seed", "steps", "tokens", "last train loss", "val denoise loss",
                     "val complete loss", "minutes"], trows) + [""]
    est = [[v, str(b.sequences), f"{b.tokens_per_sequence:.1f}", f"{b.passes_needed:.2f}", f"{b.steps_needed:.0f}"]
           for v, b in plan.budget.items()]
    lines += ["Budget check (before any compute): tokens per training sequence with each variant's objective, and "
              f"the passes over the data the budget needs (at most max_epochs = {r.max_epochs:g}).", ""]
    lines += _table(["variant", "training sequences", "tokens / sequence", "passes", "steps (est.)"], est) + [""]

    lines += depth_section(plan, depth)

    # wall time of every stage
    stages = state.data["stages"]
    lines += ["## Wall time per stage", ""]
    lines += _table(["stage", "minutes"], [[k, _fmt(float(v.get("seconds", math.nan)) / 60, ".1f")]
                                           for k, v in stages.items()]) + [""]
    total = sum(float(v.get("seconds", 0.0)) for v in stages.values())
    lines += [f"Total: {total / 60:.1f} minutes (summed over resumed pieces).", ""]

    text = verdict(plan, diffs, n_params)
    lines += ["## Verdict", "", text, ""]
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines))
    result = {
        "name": r.name, "variants": variants, "pretrain_seeds": r.pretrain_seeds, "head_seeds": plan.eval_seeds,
        "token_budget": r.token_budget, "n_parameters": n_params,
        "rows": [{"task": x.task, "test": x.test, "metric": x.metric, "primary": x.primary,
                  "values": {v: {str(s): {str(h): val for h, val in by.items()} for s, by in ps.items()}
                             for v, ps in x.values.items()}} for x in rows],
        "differences": [{"task": d.task, "test": d.test, "metric": d.metric,
                         **{k: getattr(d.diff, k) for k in ("treatment", "reference", "estimate", "low", "high",
                                                               "confidence", "n_proteins", "resamples")},
                         "by_pretrain_seed": {str(k): v for k, v in d.diff.by_pretrain_seed.items()},
                         "reading": d.diff.reading} for d in diffs],
        "pretraining": pretrain, "verdict": text,
    }
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(_clean(result), indent=1) + "\n")
    return result


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
