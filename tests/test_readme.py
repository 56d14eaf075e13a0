"""What the README shows, runs; what README and docs/ name, exists.

Every fenced code block of README.md is a test case. Each line of a bash block (comments dropped, ``\\``
continuations joined) and each python block is run after an explicit substitution table has replaced what
cannot run here: published Hub checkpoints become tiny random checkpoints of the same family and file layout
(8 and 12 encoder layers, so the layer numbers the README names exist; see ``_prott5_like`` and ``_esm2_like``), downloads become
vendored excerpts under tests/data, 4 GPUs or 4 nodes x 8 GPUs become 2 CPU processes under torchrun (gloo), and
pretraining recipes get a handful of steps of the ``debug`` shape. A block in a language, or a line starting with a
program, that this file does not know how to run fails the test, so the README cannot grow untested blocks.
Each entry of the table must still match the README, so the table cannot go stale either.

Commands run in-process through ``protlm.cli.main.main`` and must return 0; files named after an output option
(``-o``, ``--per-protein``, ...) must exist afterwards. torchrun lines run as real subprocesses.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml

import protlm
from protlm.cli.main import COMMANDS, main
from tests.conftest import DATA, odd_config
from tests.train_helpers import mini_ablation_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
EVAL = os.path.join(DATA, "eval")


# --- reading the README ------------------------------------------------------------------------------------------
@dataclass
class Block:
    lang: str  # the word after the opening fence
    text: str
    line: int  # 1-based line of the opening fence in README.md
    heading: str  # the nearest heading above it
    index: int  # 1 for the first block under that heading, 2 for the next, ...

    @property
    def name(self) -> str:  # a test id that survives edits elsewhere in the README
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-{self.index}-{self.lang or 'plain'}"


def readme_blocks(path: str = README) -> list[Block]:
    blocks, heading, fence = [], "top", None
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines, 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence = (line[3:].strip(), i, [])
        elif line.startswith("```"):
            index = 1 + sum(b.heading == heading for b in blocks)
            blocks.append(Block(fence[0], "\n".join(fence[2]), fence[1], heading, index))
            fence = None
        else:
            fence[2].append(line)
    assert fence is None, f"README.md: code block opened at line {fence[1]} is never closed"
    return blocks


def bash_commands(text: str) -> list[str]:
    """The commands of a bash block: ``\\`` continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


# --- the stand-ins -----------------------------------------------------------------------------------------------
# (README text, replacement, why). Replacements may name {ankh3}, {prott5}, {parquet}, {suite}: files the fixture
# below writes. Applied in order, to every line and every python block.
SUBSTITUTIONS = [
    ("ElnaggarLab/ankh3-large", "{ankh3}", "published Ankh3: a tiny random Ankh3-family checkpoint"),
    ("Rostlab/prot_t5_xl_uniref50", "{prott5}", "published ProtT5: a tiny random checkpoint with ProtT5's file layout"),
    ("facebook/esm2_t33_650M_UR50D", "{esm2}", "published ESM-2: a tiny random checkpoint with ESM-2's file layout"),
    ("airkingbd/dplm_150m", "{dplm}", "published DPLM: a tiny random ESM-layout checkpoint marked as DPLM"),
    ("nferruz/ProtGPT2", "{protgpt2}",
     "published ProtGPT2: a tiny random GPT2LMHeadModel saved by transformers, with a BPE in ProtGPT2's files"),
    ("runs/ankh3-large/final", "{ankh3}", "the export of a finished pretraining run: the tiny checkpoint"),
    ("data/uniref50.fasta.gz", os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz"), "UniRef50: 80 E. coli proteins"),
    ("data/uniref50-parquet/", "{parquet}", "UniRef50 as parquet: the CATH excerpt in two parquet files"),
    ("proteome.fasta.gz", os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz"), "a user's proteome: 80 E. coli proteins"),
    ("wildtype.fasta", os.path.join(DATA, "gb1_5LDE_1.fasta"), "a wild type: GB1 (5LDE_1)"),
    ("variants.csv", os.path.join(DATA, "flip_gb1_three_vs_rest_excerpt.csv"), "variants: 40 FLIP GB1 rows"),
    ("configs/eval/ankh3.yaml", "{suite}", "the full suite needs ../shared/data: a two-task suite on tests/data/eval"),
    ("data/benchmarks", EVAL, "benchmark files: the vendored excerpts"),
    ("data/ssp_netsurfp", os.path.join(DATA, "ssp3_flip_excerpt"), "FLIP SS3 split: the vendored 55-chain excerpt"),
    ("--max-proteins 200", "--max-proteins 6 --max-length 48 --probe-train 20 --probe-test 6 --cka-tokens 512",
     "depth analysis on a handful of short proteins"),
    ("--max-new-tokens 200", "--max-new-tokens 24", "short completions from a random model"),
    ("--num 10 --max-new-tokens 100", "--num 3 --max-new-tokens 24", "a few short completions from a random model"),
    ("configs/ablation/tiny-cpu.yaml", "{ablation}",
     "the CPU ablation recipe needs ../shared/data: the miniature recipe of tests/test_ablate.py (2 variants)"),
    ("src/protlm/resources/demo", os.path.join(ROOT, "src", "protlm", "resources", "demo"),
     "the demo's bundle, named from the repository root"),
    ("runs/demo/", "runs/demo-30min/", "the main job's run: the demo of the line above"),
    ("my.fasta", os.path.join(DATA, "ecoli_k12_excerpt.fasta"), "your proteins: 80 E. coli proteins"),
    ("--out runs/demo-30min/esm2", "--out runs/demo-30min/esm2 --quick",
     "the demo line runs the quick profile, so the evaluation beside it does too (one seed, subsets, one epoch)"),
    ("torchrun --nproc_per_node 4", "torchrun --standalone --nproc_per_node 2", "4 GPUs: 2 CPU processes (gloo)"),
    ("torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head-node:29500",
     "torchrun --standalone --nproc-per-node 2", "4 nodes x 8 GPUs: 2 CPU processes on this machine (gloo)"),
]

# Appended to every `pretrain` command (in-process or under torchrun): the debug shape, a few steps, fp32 on CPU.
PRETRAIN_SHRINK = ["--set", "model.preset=debug", "--set", "run.steps=3", "--set", "run.batch_size=4",
                   "--set", "run.micro_batch_size=2", "--set", "run.precision=fp32", "--set", "run.device=cpu",
                   "--set", "run.threads=1", "--set", "data.workers=0", "--set", "data.max_length=64",
                   "--set", "optim.warmup_steps=1", "--set", "eval.every=0", "--set", "checkpoint.every=2",
                   "--set", "log.progress=false", "--set", "log.tensorboard=false"]

OUTPUT_OPTIONS = {"-o", "--output", "--out", "--per-protein", "--per-residue", "--coords", "--table"}

# Blocks that train or start processes take tens of seconds each.
SLOW_WORDS = ("pretrain", "torchrun", "evaluate", "analyze", "demo", "ablate")

# Every `protlm demo` line runs the demo's quick profile with a few seconds of pretraining (as tests/test_demo.py
# does; a later --minutes wins over the README's): the full demo is a coffee break, not a test.
DEMO_SHRINK = ["--minutes", "0.1", "--profile", "quick", "--threads", "1"]

# The placeholders for commands other engineers are adding: skipped only while the command does not exist.
PENDING_COMMANDS = {"demo": "issue 8", "ablate": "issue 9"}


def _mini_suite(path: str) -> str:
    suite = {
        "name": "readme-mini",
        "data_root": EVAL,
        "seeds": [7],
        "training": {"epochs": 1, "warmup_steps": 2, "grad_accum": 4, "precision": "fp32"},
        "quick": {"training": {"epochs": 1}, "max_train": 10, "max_valid": 3, "max_test": 4, "max_folds": 2},
        "datasets": {
            "flip_ss3": {"format": "flip_ss", "files": {"sequences": "flip_ss3_sequences.fasta",
                                                        "labels": "flip_ss3_labels.fasta",
                                                        "mask": "flip_ss3_mask.fasta"}},
            "casp12": {"format": "ss_csv", "files": {"all": "CASP12_excerpt.csv"}},
            "gb1": {"format": "flip_csv", "files": {"path": "gb1_three_vs_rest_excerpt.csv"}},
        },
        "tasks": [
            {"name": "SSP-3", "kind": "residue_classification", "label": "ss3", "classes": ["H", "E", "C"],
             "train": "flip_ss3/train", "valid": "flip_ss3/valid",
             "test": {"CASP12": "casp12", "NEW364": "flip_ss3/test"}},
            {"name": "GB1", "kind": "protein_regression", "label": "fitness", "train": "gb1/train",
             "valid": "gb1/valid", "test": {"FLIP": "gb1/test"}},
        ],
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(suite, fh, sort_keys=False)
    return path


def _parquet_dir(path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from protlm.data.fasta import read_fasta

    records = list(read_fasta(os.path.join(DATA, "cath_s20_excerpt.fasta")))
    os.makedirs(path)
    half = len(records) // 2
    for i, part in enumerate((records[:half], records[half:])):
        table = pa.table({"id": [r.id for r in part], "sequence": [r.sequence for r in part]})
        pq.write_table(table, os.path.join(path, f"part-{i}.parquet"))
    return path


def _prott5_like(path: str) -> str:
    """Shaped like the files of Rostlab/prot_t5_xl_uniref50: a SentencePiece word model of the 25 residue letters
    written space-separated (28 pieces; the 100 sentinels that make up the config's 128 ids are added by
    transformers' T5Tokenizer, not stored), ReLU, a tied head, and a config.json without protlm_family, so loading
    it takes the same family inference and vocabulary path as the published checkpoint."""
    import json

    import numpy as np
    import sentencepiece as spm

    from protlm.model.t5 import T5

    os.makedirs(path)
    rng = np.random.default_rng(0)
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.writelines(" ".join(rng.choice(list("LAGSVERTIDPKNFQYHMCWXUZOB"), size=60)) + "\n" for _ in range(400))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(path, "spiece"), model_type="word",
                                   vocab_size=28, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    os.unlink(corpus)
    os.unlink(os.path.join(path, "spiece.vocab"))
    torch.manual_seed(2)
    config = odd_config(ffn="relu", tied=True, vocab_size=128, num_layers=12, num_decoder_layers=3,
                        protlm_family="custom")
    protlm.save_pretrained(T5(config).eval(), path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    del data["protlm_family"]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    loaded = protlm.load(path)  # the stand-in must be read the way the published model is
    assert loaded.config.protlm_family == "prot-t5" and loaded.tokenizer.space_separated
    return path


def _esm2_like(path: str) -> str:
    """Shaped like the files of facebook/esm2_*: config.json (model_type esm, EsmForMaskedLM, rotary, token
    dropout, 1026 positions, no protlm_family), vocab.txt and the EsmForMaskedLM tensor names, so loading it takes
    the published model's family inference, vocabulary and window (1022 residues)."""
    import json

    from protlm.config import EsmConfig

    pre = protlm.load(EsmConfig(hidden_size=40, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37),
                      random_init=True, seed=3)
    protlm.save_pretrained(pre.model, path, pre.tokenizer)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    del data["protlm_family"]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    loaded = protlm.load(path)  # the stand-in must be read the way the published model is
    assert loaded.config.protlm_family == "esm2" and loaded.model.max_residues == 1022
    assert os.path.exists(os.path.join(path, "vocab.txt")) and loaded.tokenizer.bos_id == 0
    return path


def _dplm_like(path: str) -> str:
    """DPLM keeps ESM-2's layout; protlm_family marks the objective (depth --compare labels it diffusion)."""
    from protlm.config import EsmConfig

    pre = protlm.load(EsmConfig(hidden_size=40, num_hidden_layers=6, num_attention_heads=4, intermediate_size=37,
                                protlm_family="dplm"), random_init=True, seed=4)
    protlm.save_pretrained(pre.model, path, pre.tokenizer)
    return path


def _protgpt2_like(path: str) -> str:
    """Shaped like the files of nferruz/ProtGPT2: a GPT2LMHeadModel written by transformers' save_pretrained
    (config.json with model_type gpt2 and no protlm_family) and a byte-level BPE, trained on proteins in ProtGPT2's
    text convention, as vocab.json + merges.txt + tokenizer.json with <|endoftext|> at id 0."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from protlm.data.fasta import read_fasta
    from protlm.tokenizer.bpe import EOT

    proteins = [r.sequence for r in read_fasta(os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz"), policy="x")][:40]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    texts = [EOT + "\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n" for s in proteins]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=[EOT], show_progress=False))
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=hf.get_vocab_size(), n_positions=256, n_embd=36, n_layer=3, n_head=3,
                                     n_inner=50, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    hf.model.save(path)  # vocab.json + merges.txt
    hf.save(os.path.join(path, "tokenizer.json"))
    loaded = protlm.load(path)  # the stand-in must be read the way the published model is
    assert loaded.model.kind == "causal-lm" and loaded.tokenizer.eot_id == 0
    return path


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standins")
    ankh3 = protlm.random_init(odd_config(num_layers=8, num_decoder_layers=3), seed=1)
    protlm.save_pretrained(ankh3.model, tmp / "ankh3", ankh3.tokenizer)
    _prott5_like(str(tmp / "prott5"))
    return {"ankh3": str(tmp / "ankh3"), "prott5": str(tmp / "prott5"), "esm2": _esm2_like(str(tmp / "esm2")),
            "dplm": _dplm_like(str(tmp / "dplm")), "protgpt2": _protgpt2_like(str(tmp / "protgpt2")),
            "parquet": _parquet_dir(str(tmp / "parquet")), "suite": _mini_suite(str(tmp / "suite.yaml")),
            "ablation": mini_ablation_recipe(_mkdir(tmp / "ablation"))}


def _mkdir(path):
    os.makedirs(path)
    return path


def substitute(text: str, standins: dict[str, str]) -> str:
    for old, new, _ in SUBSTITUTIONS:
        text = text.replace(old, new.format(**standins))
    return text


# --- running -----------------------------------------------------------------------------------------------------
def _outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS]


def _check_outputs(argv: list[str], cwd, line: str) -> None:
    for out in _outputs(argv):
        assert os.path.exists(os.path.join(cwd, out)), f"README line did not write {out}: {line}"


def _protlm_args(argv: list[str]) -> list[str]:
    """Arguments after ``protlm``, with the shrink for `demo` and `pretrain`. A ``--resume`` line continues the
    run an earlier line of its block finished at step 3, to step 5."""
    if argv[:1] == ["demo"]:
        return argv + DEMO_SHRINK
    if argv[:1] != ["pretrain"]:
        return argv
    return argv + PRETRAIN_SHRINK + (["--set", "run.steps=5"] if "--resume" in argv else [])


def _check_resumed(argv: list[str], cwd, line: str) -> None:
    if argv[:1] == ["pretrain"] and "--resume" in argv:
        found = glob.glob(os.path.join(str(cwd), "runs", "*", "checkpoints", "step_00000005"))
        assert found, f"the --resume line did not continue a run to step 5: {line}"


def run_protlm(argv: list[str], cwd, line: str) -> None:
    if argv and argv[0] in PENDING_COMMANDS and argv[0] not in COMMANDS:
        pytest.skip(f"protlm {argv[0]} is not in protlm.cli.main.COMMANDS yet ({PENDING_COMMANDS[argv[0]]})")
    args = _protlm_args(argv)
    try:
        code = main(args)
    except SystemExit as exit_:  # --help and argparse errors exit
        code = exit_.code
    assert code == 0, f"README line failed with exit code {code}: {line}\n(ran: protlm {shlex.join(args)})"
    _check_outputs(args, cwd, line)
    _check_resumed(args, cwd, line)


def run_torchrun(argv: list[str], cwd, line: str) -> None:
    # torchrun [launcher options] -m protlm.cli.main COMMAND ...
    assert "-m" in argv and argv[argv.index("-m") + 1] == "protlm.cli.main", f"torchrun of something else: {line}"
    split = argv.index("-m") + 2
    launcher, args = argv[1:split], _protlm_args(argv[split:])
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README line failed: {line}\n{result.stderr[-3000:]}"
    _check_outputs(args, cwd, line)


def run_line(line: str, cwd) -> None:
    argv = shlex.split(line)
    if argv[:2] == ["bash", "setup.sh"]:
        # The two top commands. setup.sh itself is not re-run (it installs packages); what follows it is.
        assert argv[2] == "&&", line
        rest = argv[3:]
        if rest[:1] == [".venv/bin/protlm"]:
            run_protlm(rest[1:] + ["--no-progress"], cwd, line)
            return
        assert rest == [".venv/bin/python", "-m", "pytest", "-q"], f"unknown set-up line: {line}"
        return  # "run the tests": this suite, running now
    if argv[0] == "protlm":
        run_protlm(argv[1:], cwd, line)
    elif argv[0] == "torchrun":
        run_torchrun(argv, cwd, line)
    else:
        pytest.fail(f"tests/test_readme.py does not know how to run this README line: {line}")


def _param(block: Block):
    slow = any(w in block.text for w in SLOW_WORDS)
    return pytest.param(block, id=block.name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("block", [_param(b) for b in readme_blocks()])
def test_readme_block_runs(block, standins, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTLM_CACHE", str(tmp_path / "cache"))  # evaluate's embeddings cache
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # recipes are named relative to the repo
    monkeypatch.chdir(tmp_path)
    n_threads = torch.get_num_threads()
    try:
        if block.lang == "bash":
            commands = bash_commands(block.text)
            assert commands, f"empty bash block at README.md line {block.line}"
            for line in commands:
                run_line(substitute(line, standins), tmp_path)
        elif block.lang == "python":
            code = compile(substitute(block.text, standins), f"README.md:{block.line}", "exec")
            exec(code, {"__name__": "readme"})
        else:
            pytest.fail(f"README.md line {block.line}: a ```{block.lang} block that tests/test_readme.py cannot run")
    finally:
        torch.set_num_threads(n_threads)  # --threads / run.threads set it for the whole process


def test_substitution_table_matches_the_readme():
    """Every stand-in still replaces something, so the table cannot drift from the README unnoticed."""
    text = "\n".join(b.text for b in readme_blocks())
    text = re.sub(r"\\\n\s*", " ", text)
    unused = [old for old, _, _ in SUBSTITUTIONS if old not in text]
    assert not unused, f"substitutions that no README block uses any more: {unused}"


def test_block_parser_sees_every_fence(tmp_path):
    (tmp_path / "R.md").write_text("# A\n```bash\nprotlm info x \\\n  --presets  # note\n```\ntext\n## B\n```yaml\n"
                                   "a: 1\n```\n")
    blocks = readme_blocks(str(tmp_path / "R.md"))
    assert [(b.lang, b.heading, b.line, b.index) for b in blocks] == [("bash", "A", 2, 1), ("yaml", "B", 8, 1)]
    assert bash_commands(blocks[0].text) == ["protlm info x --presets"]


def test_unknown_lines_fail(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="does not know how to run"):
        run_line("wget https://example.org/x.fasta", tmp_path)
    with pytest.raises(AssertionError, match="exit code 2"):
        run_line("protlm embed no-such-checkpoint-dir x.fasta --per-protein p.h5", tmp_path)


# --- docs do not drift -------------------------------------------------------------------------------------------
def _doc_files() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def _code_in(text: str) -> list[str]:
    """Fenced blocks and inline code spans: where a command name is a command, not an English word."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    fenced = [re.sub(r"(?:^|\s)#.*", "", f) for f in fenced]  # comments are prose
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def test_every_protlm_subcommand_named_in_readme_and_docs_exists():
    named = {}
    for path in _doc_files():
        for code in _code_in(open(path, encoding="utf-8").read()):
            for match in re.finditer(r"(?:^|[\s/])protlm(?:\.cli\.main)? +([a-z][a-z0-9-]*)", code, re.M):
                named.setdefault(match.group(1), os.path.basename(path))
    assert {"embed", "pretrain", "evaluate", "analyze"} <= set(named)  # the pattern finds commands at all
    allowed = set(COMMANDS) | set(PENDING_COMMANDS)
    missing = {cmd: where for cmd, where in named.items() if cmd not in allowed}
    assert not missing, f"docs name protlm sub-commands that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    """``protlm.a.b`` is a module, or an attribute of the longest module prefix. A module that exists but fails
    to import raises: that is a bug to see, not a missing name."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent is a plain module, not a package
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


FILE_EXTENSIONS = {"json", "safetensors", "csv", "md", "h5", "png", "yaml", "pt", "fasta"}


def test_module_paths_in_architecture_exist():
    text = open(os.path.join(DOCS, "architecture.md"), encoding="utf-8").read()
    dotted = set(re.findall(r"`(protlm(?:\.[A-Za-z_0-9]+)+)", text))
    packages = set(os.listdir(os.path.join(ROOT, "src", "protlm")))
    for diagram in re.findall(r"^```\n(.*?)^```", text, re.M | re.S):  # the data-flow sketch names modules bare
        dotted |= {f"protlm.{n}" for n in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)\b", diagram) 
                   if n.split(".")[0] in packages and n.rsplit(".", 1)[1] not in FILE_EXTENSIONS}
    files = set(re.findall(r"`((?:src|configs|bench|tests)/[\w/.-]+)`", text))
    assert len(dotted) > 20  # the page names the modules this way
    missing = sorted([d for d in dotted if not _resolves(d)] + [f for f in files if not os.path.exists(os.path.join(ROOT, f))])
    assert not missing, f"docs/architecture.md names modules or files that do not exist: {missing}"


def test_every_package_is_in_architecture():
    text = open(os.path.join(DOCS, "architecture.md"), encoding="utf-8").read()
    packages = [d for d in os.listdir(os.path.join(ROOT, "src", "protlm"))
                if os.path.isfile(os.path.join(ROOT, "src", "protlm", d, "__init__.py"))]
    absent = [p for p in packages if f"protlm.{p}" not in text]
    assert not absent, f"packages missing from docs/architecture.md: {absent}"


def test_links_between_docs_resolve():
    broken = []
    for path in _doc_files():
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                broken.append(f"{os.path.basename(path)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_formats_vocabulary_table_matches_the_tokenizer():
    from protlm.tokenizer.vocab import RARE, STANDARD, ankh3_vocab

    text = open(os.path.join(DOCS, "formats.md"), encoding="utf-8").read()
    row = re.search(r"^\| 7-26 \| [^`]*`([A-Z ]+)` \|$", text, re.M)
    assert row and row.group(1).split() == list(STANDARD)
    rare = re.search(r"^\| 27-30 \| `([A-Z ]+)` \|$", text, re.M)
    assert rare and rare.group(1).split() == list(RARE)
    vocab = ankh3_vocab()
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"], vocab["[NLU]"], vocab["[S2S]"], vocab["[NLG]"], vocab["X"]) \
        == (0, 1, 2, 3, 4, 5, 6)
    assert vocab["<extra_id_0>"] == 255 and vocab["<extra_id_224>"] == 31
    assert "`<extra_id_0>` = 255, ..., `<extra_id_224>` = 31" in text


def test_formats_lists_the_hdf5_attributes_protlm_writes(tmp_path):
    import h5py

    assert main(["embed", "debug", os.path.join(DATA, "gb1_5LDE_1.fasta"), "--random-init", "--per-protein",
                 str(tmp_path / "p.h5"), "--no-progress", "--threads", "1"]) == 0
    text = open(os.path.join(DOCS, "formats.md"), encoding="utf-8").read()
    section = text[text.index("## Embeddings (HDF5)"):text.index("## Evaluation outputs")]
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        file_attrs = set(fh.attrs)
        dataset_attrs = set(next(iter(fh.values())).attrs)
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    assert file_attrs <= documented, f"file attributes missing from docs/formats.md: {file_attrs - documented}"
    assert all(f'attrs["{a}"]' in section for a in dataset_attrs), dataset_attrs
