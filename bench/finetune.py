"""Speed of one fine-tuning step: frozen head, protlm LoRA, protlm full fine-tuning and PEFT on transformers.

One step is what the frozen protocol's trainer does per optimiser step (configs/eval/ankh3.yaml, SSP-3): the
step's 16 real training proteins packed into rows, forward, loss, backward, gradient clipping and an AdamW step.
The head is the suite's ConvBERT head (``head:``), with the suite's training settings. Four set-ups, same
proteins, same head initial weights:

- ``frozen``: the head alone on precomputed per-residue features (the frozen benchmark);
- ``lora``: protlm's code path (:class:`protlm.finetune.backbone.BackboneFeatures` with LoRA adapters from
  :mod:`protlm.finetune.lora`, rank 8 on the attention projections) feeding the same head;
- ``full``: the same with every encoder weight trained (``--finetune full``);
- ``peft``: the same weights saved by ``protlm.convert.save_pretrained``, loaded by transformers (T5EncoderModel,
  EsmModel, ...), ``peft.get_peft_model`` with the same LoRA config; the same layer's hidden states of the same
  token rows go into the same head, with the same packing and optimiser.

Before timing, the adapters of the LoRA side are given the same non-zero values on both sides and the largest
difference between protlm's and transformers' features is printed (fp32, no dropout; must be < 1e-4), with the
head's loss on both.

The set-ups alternate in rounds (``--rounds``); each round runs every step once per set-up, and each set-up's
median round is kept, since the cores are shared. Reported: residues/s and the ratios LoRA / frozen head,
protlm LoRA / PEFT (>1: protlm faster) and full / LoRA.

    .venv/bin/python bench/finetune.py                                   # demo shape and esm2_t6_8M, random init
    .venv/bin/python bench/finetune.py --shape esm2_t6_8M --threads 2 --rounds 5
    .venv/bin/python bench/finetune.py --model runs/demo/pretrain/final --dtype fp32

Prints a table per model and a JSON summary (with ``uptime`` before and after: the cores are shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from protlm.precision import choose, describe_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "..", "configs", "eval", "ankh3.yaml")
SSP_DIRS = (os.path.join(HERE, "..", "..", "shared", "data", "ssp_netsurfp"),
            os.path.join(HERE, "..", "tests", "data", "ssp3_flip_excerpt"))
# the demo's tiny Ankh3 shape (src/protlm/resources/demo/pretrain.yaml), encoder only
SHAPES = {"demo": ("tiny", {"d_model": 128, "d_kv": 32, "num_heads": 4, "d_ff": 320, "num_layers": 4,
                            "num_decoder_layers": 2})}
SETUPS = ("frozen", "lora", "full", "peft")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


# --- data and model ------------------------------------------------------------------------------------------
def ssp3_examples(task, n: int, seed: int):
    """``n`` SSP-3 training chains (seeded sample) as task examples, with their sequences, from the staged FLIP
    split or, without it, the test excerpt."""
    from protlm.evaluate.datasets import load_flip_ss

    folder = next(d for d in SSP_DIRS if os.path.exists(os.path.join(d, "flip_ss3_sampled.fasta.gz")))
    files = {k: os.path.join(folder, f"flip_ss3_{k}.fasta.gz") for k in ("sequences", "sampled", "mask")}
    files["labels"] = files.pop("sampled")
    records = load_flip_ss(files)["train"]
    rng = np.random.default_rng(seed)
    picked = [records[i] for i in rng.choice(len(records), min(n, len(records)), replace=False)]
    examples = [task.encode(r, "flip_ss3") for r in picked]
    return examples, {("flip_ss3", r.id): r.sequence for r in picked}, os.path.abspath(folder)


def load_model(name: str, model_dir: str | None):
    from protlm.config import preset
    from protlm.convert import load

    if model_dir:
        return load(model_dir, encoder_only=True, dtype=torch.float32)
    if name in SHAPES:
        base, overrides = SHAPES[name]
        return load(preset(base, **overrides), random_init=True, seed=0, encoder_only=True)
    return load(name, random_init=True, seed=0, encoder_only=True)


def hf_model(pre, directory: str) -> nn.Module:
    """The same weights through transformers: protlm's export, loaded by the family's headless class."""
    import transformers

    from protlm.convert import save_pretrained
    from protlm.finetune.lora import architecture

    save_pretrained(pre.model, directory, pre.tokenizer)
    arch = architecture(pre.model)
    cls, kw = {"t5": (transformers.T5EncoderModel, {}),
               "esm": (transformers.EsmModel, {"add_pooling_layer": False}),
               "bert": (transformers.BertModel, {"add_pooling_layer": False}),
               "gpt2": (transformers.GPT2Model, {})}[arch]
    try:  # transformers' fastest attention where the class has it (T5 has eager only)
        return cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa", **kw)
    except (ValueError, ImportError):
        return cls.from_pretrained(directory, dtype=torch.float32, **kw)


# --- the PEFT side, behind the interface the head trainer uses -------------------------------------------------
class _HFStack(nn.Module):
    """protlm's stack call, ``encoder(ids, mask, output_layers=[l]).hidden_states[l]``, on a transformers model:
    transformers' ``hidden_states`` tuple uses the same numbering (0 = embeddings, N = after the final norm)."""

    def __init__(self, hf: nn.Module, arch: str):
        super().__init__()
        self.hf = hf
        self.extra = {"use_cache": False} if arch == "gpt2" else {}  # no key/value cache in training

    def forward(self, ids, mask, output_layers):
        out = self.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, **self.extra)
        return SimpleNamespace(hidden_states={layer: out.hidden_states[layer] for layer in output_layers})


class _HFHolder(nn.Module):
    def __init__(self, hf: nn.Module, arch: str):
        super().__init__()
        self.encoder = _HFStack(hf, arch)


def peft_features(pre, protlm_side, directory: str, cfg, sequences):
    """The PEFT side: ``peft.get_peft_model`` on transformers, behind :class:`BackboneFeatures`, so that it gets
    the same token rows, windows, batching and feature rows as protlm's side; only the model differs."""
    import peft

    from protlm.finetune.backbone import BackboneFeatures
    from protlm.finetune.lora import architecture, lora_parameter_count, resolve_targets

    class PeftFeatures(BackboneFeatures):
        def start(self, seed: int) -> None:  # built once, below
            pass

    hf = hf_model(pre, directory)
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=resolve_targets(pre.model, cfg.lora_targets, cfg.lora_ffn), bias="none")
    model = peft.get_peft_model(hf, config)
    ours = lora_parameter_count(protlm_side.model)
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if ours != theirs:
        sys.exit(f"LoRA parameters differ: protlm {ours}, peft {theirs}; the two sides would not be comparable")
    feats = PeftFeatures(pre, "lora", cfg, sequences, layer=protlm_side.layer)
    feats.model = _HFHolder(model, architecture(pre.model))
    return feats


def copy_adapters(protlm_side, peft_side, seed: int) -> None:
    """Give protlm's adapters non-zero B (A is already random) and copy them all to the PEFT model, so that the
    parity check exercises the adapter path."""
    from peft import set_peft_model_state_dict

    from protlm.finetune.lora import lora_state_dict

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in protlm_side.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft_model = peft_side.model.encoder.hf
    wanted = {n for n, _ in peft_model.get_base_model().named_modules()}
    state = {}
    for key, value in lora_state_dict(protlm_side.model).items():
        module = key.rsplit(".", 2)[0]
        # protlm names a headless ESM/BERT/GPT-2 stack esm./bert./transformer.; transformers' headless class does not
        target = module if module in wanted else module.split(".", 1)[1]
        state[f"base_model.model.{target}.{key.rsplit('.', 2)[1]}.weight"] = value
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        sys.exit(f"adapter copy to peft: unexpected keys {result.unexpected_keys[:3]}")


# --- one training step ---------------------------------------------------------------------------------------
def train_step(head, features, chunk, opt, backbone_params, cfg, precision: str, device) -> float:
    """What :func:`protlm.evaluate.training.train_head` does per optimiser step (without the schedule)."""
    from protlm.evaluate.training import optimiser_step

    return optimiser_step(head, chunk, features, opt, cfg, device, precision, backbone_params)


class Setup:
    """One set-up: its features (stored or a trainable backbone), its own head copy and its AdamW."""

    def __init__(self, name, features, head0, cfg, backbone_groups):
        self.name, self.features = name, features
        self.head = copy.deepcopy(head0)
        groups = [{"params": list(self.head.parameters())}] + backbone_groups
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        self.backbone = [p for g in backbone_groups for p in g["params"]]
        self.rates: list[float] = []  # residues per wall-second, one per round
        self.cpu_rates: list[float] = []  # residues per CPU-second of this process (all threads)

    def run(self, steps, cfg, precision, device) -> tuple[float, float]:
        """(wall, CPU) seconds for one pass over ``steps`` (lists of examples), in training mode."""
        self.head.train()
        if getattr(self.features, "trainable", False):
            self.features.train(True)
        t0, c0 = time.perf_counter(), time.process_time()
        for chunk in steps:
            train_step(self.head, self.features, chunk, self.opt, self.backbone, cfg, precision, device)
        return time.perf_counter() - t0, time.process_time() - c0


def parity(head0, lora_side, peft_side, chunk, cfg, device) -> dict[str, float]:
    """fp32, no dropout: the largest feature difference and the head's loss on both sides."""
    from protlm.evaluate.training import _passes

    out = {}
    lora_side.train(False)
    peft_side.train(False)
    with torch.no_grad():
        ours, theirs = lora_side.tensors(chunk), peft_side.tensors(chunk)
        out["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
        out["max_abs"] = max(float(a.abs().max()) for a in ours)
        head = copy.deepcopy(head0).eval()
        for name, feats in (("loss_protlm", lora_side), ("loss_peft", peft_side)):
            loss = 0.0
            for x, mask, y, seg, _ in _passes(head, chunk, feats, cfg.micro_batch_tokens, device):
                loss += float(head.per_protein_loss(head(x, mask, seg), y, seg).sum()) / len(chunk)
            out[name] = loss
    return out


def bench_model(label: str, pre, args, suite, task, precision: str, device) -> dict:
    from protlm.evaluate.heads import ConvBertHead
    from protlm.finetune.backbone import BackboneFeatures

    cfg = suite.train_config(task)
    ft = suite.finetune_config()
    if args.lora_dropout is not None:
        ft.lora_dropout = args.lora_dropout
    exs, sequences, source = ssp3_examples(task, args.proteins, args.seed)
    group = cfg.proteins_per_step
    steps = [exs[i:i + group] for i in range(0, len(exs), group)]
    residues = sum(e.length for e in exs)

    lora_feats = BackboneFeatures(pre, "lora", ft, sequences, layer=args.layer)
    lora_feats.start(args.seed)
    full_feats = BackboneFeatures(pre, "full", ft, sequences, layer=args.layer)
    full_feats.start(args.seed)
    tmp = tempfile.mkdtemp(prefix="protlm-bench-ft-")
    peft_feats = peft_features(pre, lora_feats, tmp, ft, sequences)
    copy_adapters(lora_feats, peft_feats, args.seed)
    # the frozen protocol's stored features: the base model's, computed once (what `protlm embed` writes)
    full_feats.train(False)
    stored = {e.id: full_feats(e) for e in exs}

    torch.manual_seed(args.seed)
    head0 = ConvBertHead(lora_feats.dim, task.kind, task.n_out, suite.head).to(device)
    check = parity(head0, lora_feats, peft_feats, steps[0], cfg, device)
    n_layers = pre.model.encoder.n_layers
    params = sum(p.numel() for p in pre.model.encoder.parameters())
    print(f"\n== {label}: {type(pre.model).__name__} {n_layers} layers, d_model {lora_feats.dim}, "
          f"{params / 1e6:.1f}M encoder parameters; features of layer {lora_feats.layer} (prefix {lora_feats.prefix})")
    print(f"proteins: {len(exs)} SSP-3 training chains from {source} ({residues} residues, lengths "
          f"{min(e.length for e in exs)}-{max(e.length for e in exs)}), {len(steps)} step(s) of up to {group}")
    print(f"LoRA: rank {ft.lora_rank}, alpha {ft.lora_alpha:g}, dropout {ft.lora_dropout:g} on "
          f"{', '.join(sorted(peft_feats.model.encoder.hf.peft_config['default'].target_modules))}; "
          f"{sum(p.numel() for p in lora_feats.trainable_parameters())} adapter parameters")
    ok = check["max_abs_diff"] < 1e-4
    print(f"parity (fp32, eval): max |protlm - transformers+peft| of the features {check['max_abs_diff']:.2e} "
          f"(features up to {check['max_abs']:.1f}) {'OK' if ok else 'TOO LARGE'}; head loss "
          f"{check['loss_protlm']:.6f} vs {check['loss_peft']:.6f}")
    if not ok:
        sys.exit("protlm and transformers+peft do not compute the same features; timing them means nothing")

    setups = [Setup("frozen", lambda e: stored[e.id], head0, cfg, []),
              Setup("lora", lora_feats, head0, cfg, lora_feats.param_groups()),
              Setup("full", full_feats, head0, cfg, full_feats.param_groups()),
              Setup("peft", peft_feats, head0, cfg, [{"params": peft_feats.trainable_parameters(),
                                                      "lr": ft.adapter_lr, "weight_decay": 0.0}])]
    for s in setups:  # warm-up: allocator, optimiser state
        s.run(steps[:1], cfg, precision, device)
    for r in range(args.rounds):
        order = setups if r % 2 == 0 else setups[::-1]
        for s in order:
            wall, cpu = s.run(steps, cfg, precision, device)
            s.rates.append(residues / wall)
            s.cpu_rates.append(residues / cpu)
    rate = {s.name: statistics.median(s.rates) for s in setups}
    cpu_rate = {s.name: statistics.median(s.cpu_rates) for s in setups}
    ratios, cpu_ratios = ({"lora_over_frozen": r["lora"] / r["frozen"], "lora_over_peft": r["lora"] / r["peft"],
                           "full_over_lora": r["full"] / r["lora"]} for r in (rate, cpu_rate))
    print(f"{'set-up':40s} {'residues/s':>10s} {'res/CPU-s':>10s}  rounds (residues/s)")
    names = {"frozen": "frozen: head step on stored features", "lora": "protlm LoRA (BackboneFeatures + head)",
             "full": "protlm full fine-tuning", "peft": "PEFT on transformers + the same head"}
    for s in setups:
        print(f"{names[s.name]:40s} {rate[s.name]:10.0f} {cpu_rate[s.name]:10.0f}  "
              f"{' '.join(f'{v:.0f}' for v in s.rates)}")
    for what, r in (("wall", ratios), ("CPU", cpu_ratios)):
        print(f"{what:4s}: LoRA / frozen head {r['lora_over_frozen']:.3f}x (a LoRA step costs "
              f"{1 / r['lora_over_frozen']:.1f} frozen steps); protlm LoRA / PEFT {r['lora_over_peft']:.2f}x; "
              f"full / LoRA {r['full_over_lora']:.2f}x")
    return {"model": label, "layers": n_layers, "d_model": lora_feats.dim, "encoder_parameters": params,
            "proteins": len(exs), "residues": residues, "steps": len(steps), "parity": check,
            "residues_per_s": rate, "residues_per_cpu_s": cpu_rate, "ratios": ratios, "cpu_ratios": cpu_ratios,
            "rounds": {s.name: s.rates for s in setups}, "cpu_rounds": {s.name: s.cpu_rates for s in setups}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Reads SSP-3 chains from ../shared/data/ssp_netsurfp, else the test excerpt.")
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: random init of --shape)")
    ap.add_argument("--shape", nargs="+", default=["demo", "esm2_t6_8M"],
                    help="random-init shapes: 'demo' (the demo's tiny Ankh3: d_model 128, 4 layers) or a preset name")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the set-ups alternating within each")
    ap.add_argument("--proteins", type=int, default=16, help="SSP-3 training chains (16 per optimiser step)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16: autocast on every side (weights and optimiser stay fp32); auto: protlm's choice "
                         "for training on this CPU")
    ap.add_argument("--lora-dropout", type=float, default=None,
                    help="LoRA dropout on both LoRA sides (default: the suite's finetune.lora_dropout, 0.05)")
    ap.add_argument("--layer", type=int, default=-1, help="encoder layer the head reads (-1: the last)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, raised by peft
    from protlm.evaluate.suite import load_suite

    device = torch.device("cpu")
    suite = load_suite(SUITE)
    task = suite.task("SSP-3")
    precision = choose(args.dtype, device, "training", option="--dtype").name
    before = uptime()
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"dtype {args.dtype} -> {precision} ({choose(args.dtype, device, 'training').describe()})")
    print(f"load before: {before}")
    cfg = suite.train_config(task)
    print(f"protocol: configs/eval/ankh3.yaml SSP-3; head {suite.head}; AdamW lr {cfg.lr:g}, clip "
          f"{cfg.max_grad_norm}, {cfg.proteins_per_step} proteins per step, packed rows of <= "
          f"{cfg.micro_batch_tokens} residues")
    results = []
    labels = [args.model] if args.model else args.shape
    for label in labels:
        pre = load_model(label, args.model)
        results.append(bench_model(label, pre, args, suite, task, precision, device))
    after = uptime()
    print(f"\nload after: {after}")
    print(json.dumps({"config": vars(args), "precision": precision, "machine": describe_cpu(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__, "results": results,
                      "uptime_before": before, "uptime_after": after}))


if __name__ == "__main__":
    main()
