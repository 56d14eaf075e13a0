"""protlm.precision: the one place that picks a compute dtype, checked with faked measurements."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

from protlm import precision as P
from protlm.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2 = "fp32:55,bf16:1.1,fp16:0.6"  # AMD Zen 3, one thread: bf16 and fp16 emulated
AVX512_BF16 = "fp32:200,bf16:420,fp16:3.4"  # AMD Zen 4 (avx512_bf16), two threads
ARM_FP16 = "fp32:100,bf16:40,fp16:190"  # a CPU with native fp16 but no bf16 (shape of some ARM cores)


@pytest.fixture
def rates(monkeypatch):
    def use(text: str) -> None:
        monkeypatch.setenv(P.ENV_RATES, text)
    return use


@pytest.mark.parametrize("cpu, purpose, expected", [
    (AVX2, "training", "fp32"), (AVX2, "inference", "fp32"),
    (AVX512_BF16, "training", "bf16"), (AVX512_BF16, "inference", "bf16"),
    (ARM_FP16, "training", "fp32"),  # fp16 training needs loss scaling: never picked
    (ARM_FP16, "inference", "fp16"),
])
def test_auto_on_cpu_follows_the_measured_rates(rates, cpu, purpose, expected):
    rates(cpu)
    p = P.choose("auto", "cpu", purpose)
    assert p.name == expected and p.requested == "auto"
    assert p.dtype == P.DTYPES[expected]


def test_auto_says_why(rates):
    rates(AVX2)
    text = P.choose("auto", "cpu", "training").describe()
    assert text.startswith("precision auto -> fp32 (bf16 matmul runs at 2% of fp32 on this CPU: ")
    rates(AVX512_BF16)
    assert "bf16 matmul runs 2.1x fp32" in P.choose(None, "cpu").describe()


def test_a_forced_slow_type_warns_with_the_ratio_and_is_kept(rates):
    rates(AVX2)
    said = []
    p = P.choose("bf16", "cpu", "training", option="run.precision", warn=said.append)
    assert p.name == "bf16" and p.dtype == torch.bfloat16
    assert len(said) == 1 and "\n" not in said[0]
    assert "run.precision bf16 is slow" in said[0] and "1.1 GFLOP/s against 55.0 in fp32" in said[0]
    assert "2% of fp32" in said[0] and "'auto' would pick fp32" in said[0]


def test_a_forced_fast_type_does_not_warn(rates):
    rates(AVX512_BF16)
    said = []
    assert P.choose("bf16", "cpu", "training", warn=said.append).name == "bf16"
    assert P.choose("fp32", "cpu", "training", warn=said.append).name == "fp32"
    assert said == []


def test_the_default_warning_goes_to_stderr(rates, capsys):
    rates(AVX2)
    P.choose("fp16", "cpu", "inference", option="--dtype")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype fp16 is slow" in err


class _FakeCuda:
    def __init__(self, bf16: bool):
        self.bf16 = bf16

    def get_device_name(self, device=None):
        return "NVIDIA Tesla V100" if not self.bf16 else "NVIDIA H100 80GB HBM3"

    def is_bf16_supported(self):
        return self.bf16


@pytest.mark.parametrize("bf16, purpose, expected", [
    (True, "training", "bf16"), (True, "inference", "bf16"),
    (False, "training", "fp32"), (False, "inference", "fp16"),
])
def test_cuda_keeps_the_bf16_else_guarded_fp16_rule(monkeypatch, rates, bf16, purpose, expected):
    rates(AVX2)  # a CUDA decision never consults the CPU rates
    fake = _FakeCuda(bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", fake.get_device_name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake.is_bf16_supported)
    p = P.choose("auto", torch.device("cuda", 0), purpose)
    assert p.name == expected and p.device == "cuda"
    assert ("supports bf16" if bf16 else "lacks bf16") in p.reason


def test_the_measurement_is_real_cached_and_short(monkeypatch):
    monkeypatch.delenv(P.ENV_RATES)
    P._RATES.clear()
    rates = P.cpu_rates()
    assert set(rates) == {"fp32", "bf16", "fp16"}
    assert rates["fp32"] > 0.1  # GFLOP/s; any CPU that runs the suite does better
    assert P.cpu_rates() is rates  # once per process and thread count
    assert P.choose("auto", "cpu").name in ("fp32", "bf16", "fp16")


def test_rates_from_the_environment_are_checked(rates):
    rates("fp32:abc")
    with pytest.raises(ConfigError, match=P.ENV_RATES):
        P.cpu_rates()
    rates("bf16:3")
    with pytest.raises(ConfigError, match="positive fp32"):
        P.cpu_rates()


@pytest.mark.parametrize("purpose, option, value, message", [
    ("training", "run.precision", "fp64", "run.precision must be one of auto, fp32, bf16; got 'fp64'"),
    ("inference", "--dtype", "half-ish", "--dtype must be one of auto, fp32, bf16, fp16; got 'half-ish'"),
    ("training", "run.precision", "fp16", "run.precision: fp16 training needs loss scaling"),
    ("training", "training.precision", "int8", "training.precision: int8 is for CPU inference"),
    ("inference", "--dtype", "int8", "--dtype must be one of auto, fp32, bf16, fp16; got 'int8'"),
])
def test_bad_names_get_one_line_naming_the_option(rates, purpose, option, value, message):
    rates(AVX2)
    with pytest.raises(ConfigError) as err:
        P.choose(value, "cpu", purpose, option=option)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_int8_only_where_allowed_and_only_on_cpu(rates):
    rates(AVX2)
    allowed = ("auto", "fp32", "bf16", "fp16", "int8")
    p = P.choose("int8", "cpu", "inference", option="--dtype", allowed=allowed)
    assert p.name == "int8" and "approximate" in p.describe() and p.dtype == torch.float32
    with pytest.raises(ConfigError, match="--dtype: int8 runs on CPUs only"):
        P.choose("int8", "cuda", "inference", option="--dtype", allowed=allowed)
    with pytest.raises(ConfigError, match="must be one of auto, fp32, bf16, fp16, int8; got 'int4'"):
        P.choose("int4", "cpu", "inference", option="--dtype", allowed=allowed)


def test_aliases_and_dtype_names():
    assert P.canonical("bfloat16") == "bf16" and P.canonical("FLOAT32") == "fp32" and P.canonical(None) == "auto"
    assert [P.dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ConfigError, match="int64"):
        P.dtype_name(torch.int64)


def test_cpu_description_names_model_and_isa():
    text = P.describe_cpu()
    assert torch.backends.cpu.get_cpu_capability() in text and "threads" in text


def _yaml_files():
    roots = [os.path.join(REPO, "configs"), os.path.join(REPO, "src", "protlm", "resources")]
    return sorted(p for r in roots for p in glob.glob(os.path.join(r, "**", "*.yaml"), recursive=True))


# The recipes for many-GPU pretraining may name bf16 (GPUs run it fast); nothing that may run on a CPU may.
GPU_RECIPES = {"ankh3-large.yaml", "ankh3-xl.yaml"}


def _precision_values(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("precision", "dtype", "embed_dtype") and not isinstance(v, (dict, list)):
                yield ".".join(path + (k,)), v
            yield from _precision_values(v, path + (k,))
    elif isinstance(node, list):
        for v in node:
            yield from _precision_values(v, path)


def test_no_cpu_recipe_names_a_half_precision():
    files = _yaml_files()
    assert len(files) >= 6  # the recipes, the eval suite, the ablation recipe and the demo's two
    seen = 0
    for path in files:
        if os.path.basename(path) in GPU_RECIPES:
            continue
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        for key, value in _precision_values(data):
            seen += 1
            assert str(value).lower() not in ("bf16", "fp16", "bfloat16", "float16", "half"), f"{path}: {key}: {value}"
    assert seen >= 4  # the training recipes and the suites do set it (to auto)
