"""The written reading of a depth report: one paragraph, and a markdown page with the tables behind it."""

from __future__ import annotations

import math

import numpy as np


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _dispensable_tail(layers: list[int], flips: list[float], n: int, threshold: float) -> int | None:
    """First layer k of the longest run of analysed layers k..n whose removal each flips < threshold."""
    if not layers or layers[-1] != n:
        return None
    i = len(layers)
    while i > 0 and math.isfinite(flips[i - 1]) and flips[i - 1] < threshold and (
            i == len(layers) or layers[i - 1] == layers[i] - 1):
        i -= 1
    return layers[i] if i < len(layers) else None


def _masked_lm(report) -> bool:
    """The output is an LM head on the analysed stack itself (masked or causal LM), not a decoder."""
    return report.model.get("output") in ("lm-head", "next-token")


def _causal(report) -> bool:
    return report.model.get("kind") == "causal-lm"


def _stack_name(report, stack: str) -> str:
    """How the text names a stack: a causal LM's one stack is no "encoder" (GPT-2 calls it the transformer)."""
    return "transformer" if _causal(report) else stack


def summary_paragraph(report) -> str:
    """A one-paragraph reading of the numbers."""
    thr = report.options["flip_threshold"]
    out = []
    if report.model["random_init"]:
        out.append("This model is randomly initialised: the numbers describe the architecture at initialisation, "
                   "not computation it has learned.")
    fm = report.full_model
    if fm and fm.get("denoising_accuracy") is not None and math.isfinite(fm["denoising_accuracy"]):
        # context for every output measure below: a model that barely beats a residue-frequency guess has flat
        # output distributions, whose top-1 flips under tiny KL changes
        out.append(f"The full model restores {fm['denoising_accuracy']:.1%} of the masked residues (NLL "
                   f"{fm['denoising_nll']:.3g} nats per residue; a uniform guess over 20 residues is {math.log(20):.2f}).")
    elif fm and fm.get("next_token_accuracy") is not None and math.isfinite(fm["next_token_accuracy"]):
        out.append(f"The full model predicts {fm['next_token_accuracy']:.1%} of next tokens (NLL "
                   f"{fm['next_token_nll']:.3g} nats per token; a token may span several residues); \"output\" below "
                   "is that next-token prediction at every position.")
    elif fm and fm.get("masked_accuracy") is not None and math.isfinite(fm["masked_accuracy"]):
        out.append(f"The full model's LM head predicts {fm['masked_accuracy']:.1%} of the masked residues (NLL "
                   f"{fm['masked_nll']:.3g} nats per residue; a uniform guess over 20 residues is {math.log(20):.2f}); "
                   "\"output\" below is that head's prediction at the masked positions.")
    for rep in (report.encoder, report.decoder):
        if rep is None:
            continue
        name, n = _stack_name(report, rep.stack), rep.n_layers
        preds = "next-token" if _causal(report) else "masked-residue"
        sk = rep.skip
        if sk is not None and sk.output_top1_agreement is not None and sk.skipped:
            flips = [1 - a if a is not None and math.isfinite(a) else math.nan for a in sk.output_top1_agreement.mean]
            kls = sk.output_kl.mean
            k = _dispensable_tail(sk.skipped, flips, n, thr)
            worst = int(np.nanargmax(flips)) if np.isfinite(flips).any() else None
            if k is not None:
                i = sk.skipped.index(k)
                which = f"the last {name} layer ({n})" if k == n else f"any single one of {name} layers {k}…{n}"
                out.append(f"Removing {which} changes the output by at most "
                           f"{max(flips[i:]):.1%}, below the {thr:.0%} threshold (share of {preds} predictions "
                           f"whose top-1 changes; KL ≤ {max(kls[i:]):.3g} nats).")
            else:
                out.append(f"No tail of {name} layers is dispensable at a {thr:.0%} threshold: removing the last "
                           f"analysed layer ({sk.skipped[-1]}) alone changes {flips[-1]:.1%} of top-1 predictions.")
            if worst is not None:
                out.append(f"The {name} layer whose removal matters most is {sk.skipped[worst]} "
                           f"({flips[worst]:.1%} of predictions change, KL {kls[worst]:.3g} nats).")
        elif sk is not None and sk.skipped:
            last = [row[-1] for row in sk.hidden_change]
            worst = int(np.nanargmax(last))
            out.append(f"Removing {name} layer {sk.skipped[worst]} changes the final stream most "
                       f"(relative change {last[worst]:.3g}); layer {sk.skipped[-1]} changes it by {last[-1]:.3g}.")
        ee = rep.early_exit
        if ee is not None:
            agree = ee.top1_agreement.mean
            # the first analysed layer from which every later exit agrees with the full model
            first = None
            for l, a in zip(reversed(ee.layers), reversed(agree)):
                if a is None or not math.isfinite(a) or a < 1 - thr:
                    break
                first = l
            what = "Exiting the encoder after layer" if name == "encoder" else "The decoder's logit lens at layer"
            if rep.stack == "encoder" and _masked_lm(report):
                what = f"The logit lens (final norm and LM head) at {name} layer"
            if first is not None and first < n:
                out.append(f"{what} {first} of {n} (and any later one) already agrees with the full model on at least "
                           f"{1 - thr:.0%} of top-1 predictions.")
            elif len(ee.layers) > 1:
                l_prev, a_prev = ee.layers[-2], agree[-2]
                out.append(f"{what} {l_prev} of {n} agrees with the full model on only {_fmt(a_prev, '.1%')} of "
                           f"top-1 predictions.")
        pr = rep.probe
        if pr is not None:
            out.append(f"A linear {pr.task.upper()} probe peaks at layer {pr.best_layer} (Q3 {pr.best_score:.3f}; "
                       f"majority class {pr.majority_baseline:.3f}) and reaches 95% of that at layer {pr.layer_95} of {n}.")
        co = rep.contribution
        if co is not None and co.layer_rel.mean:
            rel = co.layer_rel.mean
            out.append(f"Each {name} layer's update is {_fmt(rel[0], '.3g')}×‖h‖ at layer 1 and "
                       f"{_fmt(rel[-1], '.3g')}×‖h‖ at layer {n} (median {_fmt(float(np.nanmedian(rel)), '.3g')}).")
        sim = rep.similarity
        if sim is not None and len(sim.layers) > 1:
            m = np.asarray(sim.cka, dtype=float)
            adj = np.nanmean([m[i, i + 1] for i in range(len(sim.layers) - 1)])
            out.append(f"Neighbouring analysed {name} layers have mean linear CKA {adj:.2f}.")
    return " ".join(out)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report, plots: dict[str, str]) -> str:
    """The summary page: the paragraph, the main numbers as tables, the plots and where the time went."""
    m, inp = report.model, report.inputs
    shape = (f"{m['encoder_layers']} layers (a masked LM: output from its LM head)" if m.get("kind") == "masked-lm"
             else f"{m['encoder_layers']} layers (a causal LM: next-token output from its tied LM head)"
             if m.get("kind") == "causal-lm"
             else f"{m['encoder_layers']} encoder + {m['decoder_layers']} decoder layers")
    lines = [f"# Depth analysis: {m['source']}", "",
             f"{shape}, d_model {m['d_model']}, "
             f"{m['dtype']}; {inp['n_proteins']} proteins, {inp['n_residues']} residues ({inp['n_cropped']} proteins cropped "
             f"to a {report.options['max_length']}-residue window) from `{inp['path']}`."]
    fm = report.full_model
    if fm and "denoising_accuracy" in fm:
        lines.append(f"Full model on the denoising targets: top-1 accuracy {_fmt(fm['denoising_accuracy'])}, "
                     f"NLL {_fmt(fm['denoising_nll'])} nats over {fm['n_predictions']} masked residues "
                     f"(mask rate {report.options['mask_rate']}).")
    elif fm and "next_token_accuracy" in fm:
        lines.append(f"Full model (ln_f → tied LM head) predicting each next token of the clean input: top-1 accuracy "
                     f"{_fmt(fm['next_token_accuracy'])}, NLL {_fmt(fm['next_token_nll'])} nats over "
                     f"{fm['n_predictions']} tokens.")
    elif fm and "masked_accuracy" in fm:
        lines.append(f"Full model (final norm → LM head) on the residues shown as `<mask>`: top-1 accuracy "
                     f"{_fmt(fm['masked_accuracy'])}, NLL {_fmt(fm['masked_nll'])} nats over {fm['n_predictions']} "
                     f"masked residues (mask rate {report.options['mask_rate']}).")
    if m.get("output_means"):
        lines.append(f"\"Output\" in the measures below is {m['output_means']}.")
    lines += ["", "## Summary", "", report.summary, ""]
    for rep in (report.encoder, report.decoder):
        if rep is None:
            continue
        lines += [f"## {_stack_name(report, rep.stack).capitalize()}", "", f"Per-token measures average over {rep.tokens}, per protein, "
                  "then over proteins (mean shown; std in the JSON).", ""]
        co = rep.contribution
        if co is not None:
            hdr = ["layer", "‖attn‖/‖h‖"] + (["‖cross‖/‖h‖"] if co.cross_rel else []) + [
                "‖FFN‖/‖h‖", "‖Δ‖/‖h‖", "cos(attn,h)"] + (["cos(cross,h)"] if co.cross_cos else []) + ["cos(FFN,h)", "cos(Δ,h)"]
            rows = []
            for i, l in enumerate(co.layers):
                r = [str(l), _fmt(co.attn_rel.mean[i])]
                r += [_fmt(co.cross_rel.mean[i])] if co.cross_rel else []
                r += [_fmt(co.ffn_rel.mean[i]), _fmt(co.layer_rel.mean[i]), _fmt(co.attn_cos.mean[i])]
                r += [_fmt(co.cross_cos.mean[i])] if co.cross_cos else []
                r += [_fmt(co.ffn_cos.mean[i]), _fmt(co.layer_cos.mean[i])]
                rows.append(r)
            lines += ["### Contribution to the residual stream", "", _table(hdr, rows), ""]
        sk = rep.skip
        if sk is not None:
            hdr = ["skipped layer", "change of last stream"]
            if sk.output_kl:
                hdr += ["output KL (nats)", "top-1 agreement"]
            rows = []
            for i, l in enumerate(sk.skipped):
                r = [str(l), _fmt(sk.hidden_change[i][-1], ".3g")]
                if sk.output_kl:
                    r += [_fmt(sk.output_kl.mean[i], ".3g"), _fmt(sk.output_top1_agreement.mean[i])]
                rows.append(r)
            n_all = report.inputs["n_proteins"]
            over = (f"Means over a seeded sample of {sk.n_proteins} of the {n_all} proteins (`--skip-proteins`)."
                    if 0 < sk.n_proteins < n_all else f"Means over all {n_all} proteins.")
            lines += ["### Layer skipping", "", over, "", _table(hdr, rows), ""]
        ee = rep.early_exit
        if ee is not None:
            title = "Early exit (encoder layer l → final norm → decoder)" if rep.stack == "encoder" else \
                "Logit lens (decoder layer l → final norm → LM head)"
            if rep.stack == "encoder" and _masked_lm(report):
                title = f"Logit lens ({_stack_name(report, rep.stack)} layer l → final norm → LM head)"
            rows = [[str(l), _fmt(ee.kl.mean[i], ".3g"), _fmt(ee.top1_agreement.mean[i]), _fmt(ee.accuracy.mean[i])]
                    for i, l in enumerate(ee.layers)]
            lines += [f"### {title}", "", _table(["layer", "KL to full (nats)", "top-1 agreement", "accuracy"], rows), ""]
        pr = rep.probe
        if pr is not None:
            rows = [[str(l), _fmt(s), f"{a:g}"] for l, s, a in zip(pr.layers, pr.score, pr.alpha)]
            lines += [f"### Linear probe: {pr.task}", "", f"{pr.source}; {pr.n_test_residues} test residues. "
                      f"Best layer {pr.best_layer} (Q3 {pr.best_score:.3f}); 95% of best reached at layer "
                      f"{pr.layer_95}; majority class {pr.majority_baseline:.3f}.", "",
                      _table(["layer", "Q3", "ridge α"], rows), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    if report.truncated:
        t = report.truncated
        lines += ["## Truncated model", "", f"Encoder cut after layer {t['layer']} of {m['encoder_layers']} written to "
                  f"`{t['path']}` ({t['parameters']:,} parameters, {t['share_of_encoder']:.0%} of the encoder).", ""]
    t = report.timing
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k not in ("total", "wall_this_run", "resumed_after_batches"))
    cost = f"{t['total']:.1f} s in all ({parts})."
    if t.get("resumed_after_batches"):
        cost += f" Resumed after {t['resumed_after_batches']} finished batches; this run took {t['wall_this_run']:.1f} s."
    lines += ["## Cost", "", cost, ""]
    return "\n".join(lines)
