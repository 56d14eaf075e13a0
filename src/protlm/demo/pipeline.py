"""``protlm demo``: the whole system on real proteins in one resumable run.

Stages (each skipped when ``DIR/demo-state.json`` records it as finished; an interrupted stage resumes from its
own saved work):

1. ``pretrain`` - the tiny Ankh3 model, both objectives, for ``minutes`` (checkpoints every ~50 steps);
2. ``embed``    - per-residue embeddings of the evaluation proteins (pretrained model and random-init twin), and
   t-SNE maps of the CB513 proteins' per-protein embeddings;
3. ``evaluate`` - ConvBERT heads, seeds 7/0/42, against one-hot and the twin (finished heads are files); the
   pretrained model's best head per task is kept under ``DIR/heads/<task>/`` for ``protlm predict``;
4. ``depth``    - the depth analysis of the pretrained model;
5. ``complete`` - completion of held-out proteins from their first half;
6. ``report``   - ``DIR/report.md`` with the tables and plots (rewritten on every run; it only reads files).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from protlm.demo.bundle import PROJECTION_SET, default_minutes, demo_suite
from protlm.demo.state import STATE_FILE, DemoState, disk_errors
from protlm.errors import ConfigError, ProtlmError

STAGES = [
    ("pretrain", "pretrain the tiny Ankh3 model"),
    ("embed", "embed the evaluation proteins"),
    ("evaluate", "evaluate against one-hot and the random-init twin"),
    ("depth", "depth analysis"),
    ("complete", "complete held-out proteins"),
    ("report", "write the report"),
]
PROFILES = ("full", "quick")
MIN_FREE_BYTES = 1 << 30  # checkpoints, two models' per-residue embeddings of ~2,400 proteins, plots


@dataclass
class DemoOptions:
    out_dir: str = "runs/demo"
    minutes: float | None = None  # pretraining budget; None = the bundled recipe's run.time_limit_minutes
    threads: int | None = None  # torch CPU threads; None = torch's default
    profile: str = "full"  # "quick": tiny evaluation subsets, a smoke test for protlm's own tests
    device: str = "cpu"
    progress: bool = True
    completions: int = 8  # held-out proteins to complete


@dataclass
class DemoResult:
    report: str
    beats_random_init: bool
    verdict: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # stages computed in this run (the others were done already)


def check_output_dir(out_dir: str, fresh: bool) -> None:
    """A directory (or nothing yet) at ``out_dir``; for a fresh start, also enough free space for every stage."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: exists and is not a directory; choose another output directory (-o)")
    if not fresh:
        return
    parent = out_dir
    while not os.path.exists(parent):  # free space is a property of the nearest existing folder
        parent = os.path.dirname(os.path.abspath(parent))
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise ProtlmError(f"no space left on device for {out_dir}: {free / 2**20:.0f} MiB free, the demo needs "
                          f"about {MIN_FREE_BYTES / 2**20:.0f} MiB")


def run_demo(options: DemoOptions, log: Callable[[str], None] | None = None) -> DemoResult:
    import torch

    from protlm.demo import completion, depth, evaluation, pretrain, projection, report

    say = log or (lambda msg: print(f"protlm demo: {msg}", file=sys.stderr, flush=True))
    if options.profile not in PROFILES:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {options.profile!r}")
    if options.minutes is not None and not options.minutes > 0:
        raise ConfigError(f"--minutes must be positive, got {options.minutes}")
    # 0 from the recipe means no time limit: run.steps ends pretraining
    minutes = default_minutes() if options.minutes is None else float(options.minutes)
    out = options.out_dir
    check_output_dir(out, fresh=not os.path.exists(os.path.join(out, STATE_FILE)))
    with disk_errors(out):
        os.makedirs(out, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    state = DemoState(out, options.profile)
    quick = options.profile == "quick"
    suite = demo_suite()
    final_dir = os.path.join(out, "pretrain", "final")
    cache = os.path.join(out, "embeddings")
    result = DemoResult("", False, "")

    def sources():
        return evaluation.model_sources(final_dir, cache, options.threads, options.device)

    def stage(name: str, title: str, fn: Callable[[], dict]) -> dict:
        index = [n for n, _ in STAGES].index(name) + 1
        info = state.stage(name)
        if info.get("done"):
            say(f"[{index}/{len(STAGES)}] {title}: done in an earlier run ({info.get('seconds', 0):.0f} s), skipped")
            return info
        say(f"[{index}/{len(STAGES)}] {title} ...")
        t0 = time.perf_counter()
        with disk_errors(os.path.join(out, name)):
            info = state.run(name, fn)
        result.ran.append(name)
        say(f"[{index}/{len(STAGES)}] {title}: finished in {(time.perf_counter() - t0) / 60:.1f} min")
        return info

    titles = dict(STAGES)
    if state.done("pretrain") and abs(float(state.stage("pretrain").get("minutes", minutes)) - minutes) > 1e-9:
        say(f"pretraining already finished with a budget of {state.stage('pretrain')['minutes']:g} minutes (this "
            f"run asked for {minutes:g}); keeping it. Use another -o to train again.")

    def train() -> dict:
        pretrain.run_pretrain(state, out, minutes, options.threads, options.progress, say)
        return {}  # run_pretrain records its own facts (steps, minutes, validation) as it goes

    stage("pretrain", titles["pretrain"], train)
    if not os.path.exists(os.path.join(final_dir, "config.json")):
        raise ConfigError(f"{final_dir}: the pretrained model is missing although {state.path} records pretraining "
                          "as finished; delete that file (or use another -o) to start over")

    def embed() -> dict:
        proteins = evaluation.run_embedding(suite, sources(), quick, options.progress, say)
        records = evaluation.evaluation_records(suite, quick).get(PROJECTION_SET[0], [])
        pngs = projection.run_projection(sources(), records, os.path.join(out, "projection"), options.threads,
                                         options.progress, say)
        return {"proteins": proteins, "projections": {k: os.path.relpath(v, out) for k, v in pngs.items()}}

    embed_info = stage("embed", titles["embed"], embed)
    evaluate_dir = os.path.join(out, "evaluate")
    stage("evaluate", titles["evaluate"],
          lambda: {"results": os.path.relpath(evaluation.run_evaluation(
              suite, sources(), evaluate_dir, quick, options.device, options.progress, say), out)})
    # The starter heads for `protlm predict` (cheap, so copied on every run: also after a resumed evaluation)
    evaluation.export_heads(evaluate_dir, os.path.join(out, "heads"), sources()[1], say)
    depth_info = stage("depth", titles["depth"],
                       lambda: depth.run_depth(final_dir, os.path.join(out, "depth"), quick, options.progress))
    n_complete = 3 if quick else options.completions
    complete_info = stage("complete", titles["complete"],
                          lambda: {"rows": completion.run_completion(final_dir, n_complete)})
    verdict = evaluation.verdict(os.path.join(evaluate_dir, "results.json"))

    def write() -> dict:
        return {"path": report.write_report(out, state.data, verdict, embed_info.get("projections", {}), depth_info,
                                            complete_info.get("rows", []), STAGES)}

    # The report is cheap and always rewritten, so that it matches the state (e.g. stage times after a resume).
    state.update("report", done=False)
    report_info = stage("report", titles["report"], write)
    result.report = report_info["path"]
    result.beats_random_init = verdict.beats
    result.verdict = verdict.sentence()
    result.stage_seconds = {n: float(state.stage(n).get("seconds", 0.0)) for n, _ in STAGES}
    return result
