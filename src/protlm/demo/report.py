"""Stage 6: ``DIR/report.md``, one page with every table and plot of the demo (links are relative to DIR)."""

from __future__ import annotations

import json
import math
import os

import yaml

from protlm.demo.evaluation import Verdict
from protlm.train.config import DataSection
from protlm.train.metrics import read_metrics
from protlm.utils import atomic_write_text

TASK_ORDER = ("denoise", "complete")


def _exclusion_rule(data: dict) -> str:
    default = DataSection()  # a recipe that leaves the keys out gets these
    k = data.get("exclude_kmer", default.exclude_kmer)
    if not k:
        return "by exact match only (near copies stay)"
    fraction = data.get("exclude_kmer_fraction", default.exclude_kmer_fraction)
    count = data.get("exclude_kmer_count", default.exclude_kmer_count)
    return (f"by exact match and as near copies (sequences sharing >= {fraction:.0%} of their {k}-mers, or >= "
            f"{count} of them, with an excluded sequence)")


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _recipe(pre_dir: str) -> dict:
    path = os.path.join(pre_dir, "config.yaml")  # the resolved recipe the trainer saved
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def _pretrain_section(state: dict, out_dir: str) -> list[str]:
    info = state["stages"].get("pretrain", {})
    pre_dir = os.path.join(out_dir, "pretrain")
    cfg = _recipe(pre_dir)
    lines = ["## 1. Pretraining", ""]
    model_cfg = os.path.join(pre_dir, "model_config.json")
    if os.path.exists(model_cfg):
        with open(model_cfg, encoding="utf-8") as fh:
            mc = json.load(fh)
        lines.append(f"Model: {mc.get('feed_forward_proj')} feed-forward, vocabulary {mc.get('vocab_size')}, "
                     f"d_model {mc.get('d_model')}, {mc.get('num_layers')} encoder + "
                     f"{mc.get('num_decoder_layers')} decoder layers.")
    if cfg:
        obj = cfg.get("objective", {})
        probs = ", ".join(f"{task} {p:g}" for task, p in (obj.get("task_probs") or {}).items())
        lines.append(f"Objectives drawn per sequence: {probs} (denoising mask rates {obj.get('mask_rates')}, "
                     f"completion split {obj.get('completion_ratio')}). Recipe: `pretrain/config.yaml` (from "
                     "protlm's bundled `resources/demo/pretrain.yaml`).")
    budget = f"budget {info['minutes']:g} minutes of training" if info.get("minutes") else "no time limit"
    batch = (f" of {cfg['run']['batch_size']} sequences cropped to {cfg['data']['max_length']} tokens, "
             f"{cfg['optim']['name']} at lr {cfg['optim']['lr']:g}") if cfg else ""
    lines.append(f"Pretraining ran for {info.get('trained_minutes', math.nan):.1f} minutes of wall-clock, data "
                 f"set-up and checkpoints included ({budget}), {info.get('step', '?')} optimizer steps{batch}.")
    if info.get("cpu"):
        lines.append(f"It ran on {info['cpu']} in {info.get('precision', 'an unrecorded precision')}: a time "
                     "budget buys fewer steps on a slower machine, so compare runs by their step counts.")
    rows = [r for r in read_metrics(os.path.join(pre_dir, "metrics.jsonl")) if any(k.startswith("val/") for k in r)]
    if rows:
        first, last = rows[0], rows[-1]
        n_val = cfg.get("data", {}).get("validation_sequences", "the")
        lines += ["", f"Validation on {n_val} held-out proteins (loss in nats per target token; the residue loss "
                  "counts residue targets only; the unigram loss is what residue frequencies alone give, the composition loss "
                  "what each protein's own residue counts give):", "",
                  "| objective | loss at step " + f"{first['step']} | loss at step {last['step']} | residue loss | "
                  "unigram residue loss | composition residue loss |", "|---|---|---|---|---|---|"]
        for task in TASK_ORDER:
            key = f"val/{task}/loss"
            if key in last:
                lines.append(f"| {task} | {first.get(key, math.nan):.4f} | {last[key]:.4f} | "
                             f"{last.get(f'val/{task}/residue_loss', math.nan):.4f} | "
                             f"{last.get(f'val/{task}/unigram_loss', math.nan):.4f} | "
                             f"{last.get(f'val/{task}/composition_loss', math.nan):.4f} |")
    if os.path.exists(os.path.join(pre_dir, "curves.png")):
        lines += ["", "![training curves](pretrain/curves.png)"]
    return lines + [""]


def _evaluation_section(out_dir: str, verdict: Verdict, projections: dict) -> list[str]:
    path = os.path.join(out_dir, "evaluate", "results.json")
    lines = ["## 2-3. Embeddings and downstream evaluation", ""]
    if not os.path.exists(path):
        return lines + ["(no results)", ""]
    with open(path, encoding="utf-8") as fh:
        res = json.load(fh)
    sources = [s["name"] for s in res["sources"]]
    lines += [f"Ankh3's protocol: a ConvBERT head (Table 4) trained on frozen per-residue embeddings, mean ± std "
              f"over seeds {', '.join(map(str, res['results'][0]['seeds'])) if res['results'] else '-'}, "
              f"accuracy in %. Profile: {res['profile']}. Full per-seed results, timings and deviations from the "
              "paper: [evaluate/report.md](evaluate/report.md).", "",
              "| Task | Test set | Metric | " + " | ".join(sources) + " |",
              "|---|---|---|" + "---|" * len(sources)]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in res["results"]:
        mean, std = r.get("mean"), r.get("std")
        text = "n/a" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"
        cells.setdefault((r["task"], r["dataset"], r["metric"]), {})[r["source"]] = text
    for (task, test, metric), by_source in cells.items():
        lines.append(f"| {task} | {test} | {metric} | " + " | ".join(by_source.get(s, "") for s in sources) + " |")
    lines += ["", f"**{verdict.sentence()}**", ""]
    if projections:
        lines += ["Per-protein embeddings of the CB513 proteins (t-SNE), coloured by structural class read from "
                  "their DSSP labels:", ""]
        for name, png in projections.items():
            lines.append(f"![{name}]({png})")
        lines.append("")
    return lines


def _depth_section(depth: dict) -> list[str]:
    lines = ["## 4. Depth analysis", ""]
    if not depth:
        return lines + ["(not run)", ""]
    lines += [depth["summary"], "", f"Details: [depth/{depth['markdown']}](depth/{depth['markdown']}).", ""]
    for name, png in sorted(depth["plots"].items()):
        lines.append(f"![{name}](depth/{png})")
    return lines + [""]


def _completion_section(rows: list[dict]) -> list[str]:
    lines = ["## 5. Completion of held-out proteins", ""]
    if not rows:
        return lines + ["(not run)", ""]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines += [f"Each protein's first half went to the encoder (`[S2S]` task); the model wrote the rest greedily. "
              f"Identity is position by position over the true second half. Mean identity: pretrained "
              f"**{100 * mean('identity'):.1f}%**, random-init twin {100 * mean('twin_identity'):.1f}%, the prefix's "
              f"most frequent residue repeated {100 * mean('composition_identity'):.1f}%." + _dominance(rows), "",
              "| protein | length | pretrained | twin | composition | true second half (first 40) "
              "| pretrained wrote (first 40) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['length']} | {100 * r['identity']:.1f}% | {100 * r['twin_identity']:.1f}% "
                     f"| {100 * r['composition_identity']:.1f}% | `{r['truth'][:40]}` "
                     f"| `{r['pretrained'][:40] or '-'}` |")
    return lines + [""]


def _dominance(rows: list[dict]) -> str:
    """A sentence when the continuations are mostly one residue (what a barely trained decoder does)."""
    text = "".join(r["pretrained"] for r in rows)
    if not text:
        return " The pretrained model wrote no residues."
    top = max(set(text), key=text.count)
    share = text.count(top) / len(text)
    if share < 0.5:
        return ""
    return (f" {100 * share:.0f}% of the residues the pretrained model wrote are {top}: at this size and training "
            "time its decoder has mostly learnt residue frequencies, so read the identity against the composition "
            "column.")


def write_report(out_dir: str, state: dict, verdict: Verdict, projections: dict, depth: dict,
                 completions: list[dict], stage_titles: list[tuple[str, str]]) -> str:
    lines = ["# protlm demo: Ankh3 end to end on real proteins", "",
             f"**{verdict.sentence()}**", "",
             "| stage | time (summed over runs) |", "|---|---|"]
    total = 0.0
    for i, (name, title) in enumerate(stage_titles, 1):
        if name == "report":  # being written now; it takes about a second
            continue
        s = float(state["stages"].get(name, {}).get("seconds", 0.0))
        total += s
        lines.append(f"| {i}. {title} | {_fmt_minutes(s)} |")
    lines += [f"| total | {_fmt_minutes(total)} |", ""]
    lines += _pretrain_section(state, out_dir)
    lines += _evaluation_section(out_dir, verdict, projections)
    lines += _depth_section(depth)
    lines += _completion_section(completions)
    data = _recipe(os.path.join(out_dir, "pretrain")).get("data", {})
    names = lambda key: ", ".join(f"`{os.path.basename(p)}`" for p in data.get(key, [])) or "-"  # noqa: E731
    lines += ["## Data", "", "All data ship with protlm (`protlm/resources/demo/`; provenance and licences in its "
              f"SOURCES.md). Pretraining corpus: {names('train')}, with the evaluation sequences "
              f"({names('exclude_sequences')}) and the validation proteins removed, {_exclusion_rule(data)}. Validation, "
              f"depth analysis and completion: {names('validation')}. Secondary structure: NetSurfP-2.0's data "
              "(FLIP split, CB513, CASP12) and protlm's DSSP labelling of the CASP14 targets.", ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path
