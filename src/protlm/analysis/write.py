"""Writing a depth report: ``depth.json`` (every number), PNG plots, ``depth.md``, optionally a truncated encoder."""

from __future__ import annotations

import json
import os

from protlm.analysis.depth import DepthReport
from protlm.analysis.plots import write_plots
from protlm.analysis.summary import markdown
from protlm.analysis.truncate import truncate_encoder
from protlm.errors import ConfigError
from protlm.utils import atomic_write_text


def resolve_truncation(report: DepthReport, spec: str | int | None) -> int | None:
    """``auto`` = the probe's 95%-of-best layer (at least 1); an integer is used as given."""
    if spec is None:
        return None
    if spec == "auto":
        if report.encoder.probe is None:
            raise ConfigError("--truncate-at auto picks the probe's 95% layer, but no probe ran (use --task ssp3)")
        return max(1, report.encoder.probe.layer_95)
    try:
        return int(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"--truncate-at must be a layer number or 'auto', got {spec!r}") from None


def write_depth_outputs(report: DepthReport, out_dir: str, pretrained=None, truncate_at: str | int | None = None) -> dict[str, str]:
    """Write the report into ``out_dir``; returns name -> path of every file written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    k = resolve_truncation(report, truncate_at)
    if k is not None:
        if pretrained is None:
            raise ValueError("truncation needs the model")
        from protlm.convert import save_pretrained

        cut = truncate_encoder(pretrained.model, k)
        path = os.path.join(out_dir, f"encoder-{k}-layers")
        save_pretrained(cut, path, pretrained.tokenizer)
        n_cut = sum(p.numel() for p in cut.parameters())
        n_enc = sum(p.numel() for p in pretrained.model.encoder.parameters())
        report.truncated = {"layer": k, "path": path, "parameters": n_cut, "share_of_encoder": n_cut / n_enc}
        written["truncated"] = path
    plots = write_plots(report, out_dir)
    written.update({name: os.path.join(out_dir, f) for name, f in plots.items()})
    json_path = os.path.join(out_dir, "depth.json")
    atomic_write_text(json_path, json.dumps(report.to_json_dict(), indent=1) + "\n")
    md_path = os.path.join(out_dir, "depth.md")
    atomic_write_text(md_path, markdown(report, plots))
    written["json"], written["markdown"] = json_path, md_path
    return written
