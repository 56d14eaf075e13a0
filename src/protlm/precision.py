"""Which compute precision is fast on this device: the one place that decides.

Half precision is not fast everywhere. On CPUs without bf16 instructions (AVX2-only x86 such as AMD Zen 2/3 and
most Intel client chips) torch emulates a bf16 matmul at about 1/50 of the fp32 rate, and fp16 is emulated on
most x86 CPUs. So on a CPU the choice is made by measurement: once per process, a short timed square matmul in
fp32, bf16 and fp16 (about a quarter of a second in all), cached. On CUDA the rule is the usual one: bf16 where
the GPU supports it, else fp16 for inference (guarded by the caller) and fp32 for training.

``auto`` means "fast and exact enough":

- training (mixed precision: fp32 weights and optimiser, autocast for the matmuls): bf16 where it runs at least
  :data:`FAST_RATIO` times the fp32 rate, else fp32. fp16 training needs loss scaling, which protlm does not do.
- inference (embedding, scoring, generation, analysis; weights cast once): bf16 where fast, else fp16 where fast
  (callers guard against fp16 overflow), else fp32.

A precision asked for by name is used as asked; when it runs at less than :data:`SLOW_RATIO` of fp32 on this
device, :func:`choose` logs a one-line warning with the measured rates.

``PROTLM_CPU_MATMUL_GFLOPS`` (e.g. ``fp32:55,bf16:1.1,fp16:0.5``) replaces the CPU measurement: choices become
reproducible on machines whose rates are known, and tests can stand in for any CPU.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from protlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Accepted spellings of the three names (torch's own and numpy-style names included); the canonical name is DTYPES'.
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
FAST_RATIO = 1.3  # a half type is chosen by auto only at this multiple of the fp32 matmul rate or more
SLOW_RATIO = 0.5  # a forced type slower than this fraction of fp32 gets a warning
ENV_RATES = "PROTLM_CPU_MATMUL_GFLOPS"
_MATMUL_N = 384  # big enough to reach a kernel's steady rate, small enough for emulated bf16 (~0.1 s at 1 GFLOP/s)

Purpose = str  # "training" | "inference"


@dataclass(frozen=True)
class Precision:
    """A resolved compute precision and why it was chosen."""

    name: str  # "fp32", "bf16", "fp16" or "int8"
    requested: str  # what the user or recipe asked for ("auto", "bf16", ...)
    reason: str  # one clause, e.g. "bf16 matmul runs at 2% of fp32 on this CPU: AVX2"
    device: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the compute (int8 computes on fp32 activations)."""
        return DTYPES.get(self.name, torch.float32)

    @property
    def half(self) -> bool:
        return self.name in ("bf16", "fp16")

    def describe(self) -> str:
        return f"precision {self.requested} -> {self.name} ({self.reason})"

    def to_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "chosen": self.name, "reason": self.reason, "device": self.device}


def canonical(value: str | None, option: str = "precision", allowed: tuple[str, ...] = ("auto", *DTYPES)) -> str:
    """The canonical name of a precision option's value, or a one-line error naming the option and the choices."""
    name = "auto" if value is None else str(value).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16 for a torch dtype."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ConfigError(f"{dtype} is not a floating-point compute type protlm uses ({', '.join(DTYPES)})")


# --- measuring -----------------------------------------------------------------------------------------------
_RATES: dict[tuple[str, int], dict[str, float]] = {}


def cpu_rates() -> dict[str, float]:
    """GFLOP/s of a square matmul on this CPU in fp32, bf16 and fp16, with torch's current thread count.

    Measured once per process and thread count (well under a second), or read from ``PROTLM_CPU_MATMUL_GFLOPS``.
    """
    given = os.environ.get(ENV_RATES)
    if given:
        return _parse_rates(given)
    key = ("cpu", torch.get_num_threads())
    if key not in _RATES:
        _RATES[key] = _measure()
    return _RATES[key]


def _parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition(":")
        try:
            rates[canonical(name.strip(), ENV_RATES, tuple(DTYPES))] = float(value)
        except ValueError:
            raise ConfigError(f"{ENV_RATES}={text!r}: expected name:GFLOPS pairs such as fp32:55,bf16:1.1") from None
    if "fp32" not in rates or rates["fp32"] <= 0:
        raise ConfigError(f"{ENV_RATES}={text!r}: needs a positive fp32 rate")
    for name in DTYPES:
        rates.setdefault(name, 0.0)
    return rates


def _measure(budget: float = 0.08) -> dict[str, float]:
    """GFLOP/s of each dtype's matmul for this process's thread count.

    Timed on one thread and scaled by the thread count: a multi-threaded matmul waits for its slowest thread, so
    on cores that other jobs share every repetition can be slowed by a descheduled thread, and once a slow bf16
    timing read "5% of fp32" on a CPU where bf16 runs 2.3x fp32. One thread's best of several runs sees the
    core's own speed; the dtype ratios, which decide, are per core anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: rate * threads for name, rate in _measure_one_thread(budget).items()}
    finally:
        torch.set_num_threads(threads)


def _measure_one_thread(budget: float) -> dict[str, float]:
    n = _MATMUL_N
    rates = {}
    for name, dtype in DTYPES.items():
        try:
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            a @ b  # first call: kernel selection, thread start-up
            best = float("inf")
            end = time.perf_counter() + budget
            reps = 0
            while reps < 2 or (time.perf_counter() < end and reps < 50):
                t = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t)
                reps += 1
                if best > budget:  # an emulated type: one timed run says enough
                    break
            rates[name] = 2 * n ** 3 / best / 1e9
        except RuntimeError:  # the type has no CPU matmul in this build
            rates[name] = 0.0
    return rates


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """torch's vector ISA level for this CPU (AVX2, AVX512, ...), with bf16/AMX flags where Linux reports them."""
    level = torch.backends.cpu.get_cpu_capability()
    extra = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    if level.startswith("AVX512"):
        if "avx512_bf16" in flags:
            extra.append("BF16")
        if "amx_bf16" in flags:
            extra.append("AMX")
    elif "avx512f" in flags:
        # the CPU has AVX-512 but torch was told not to use it (ATEN_CPU_CAPABILITY), as when standing in for an
        # AVX2-only CPU: the kernels, and so the speeds, are AVX2's
        extra.append(f"(AVX-512 CPU limited by ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '?')})")
    return " ".join([level, *extra])


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """One line naming the CPU, its ISA level and the threads in use, for benchmark output and reports."""
    return f"{cpu_name()}, {cpu_isa()}, {torch.get_num_threads()} threads"


def cpu_peak_flops(name: str) -> float:
    """FLOP/s of a square matmul in this precision on this CPU (the stand-in for a data-sheet peak)."""
    return cpu_rates().get(canonical(name, "precision", tuple(DTYPES)), 0.0) * 1e9


# --- deciding ------------------------------------------------------------------------------------------------
def _cuda_choice(device: torch.device, purpose: Purpose) -> tuple[str, str]:
    gpu = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return "bf16", f"{gpu} supports bf16"
    if purpose == "training":
        return "fp32", f"{gpu} lacks bf16, and fp16 training needs loss scaling"
    return "fp16", f"{gpu} lacks bf16; fp16 with an overflow guard"


def _ratio_text(name: str, rates: dict[str, float]) -> str:
    share = rates.get(name, 0.0) / rates["fp32"]
    return f"{name} matmul runs at {share:.0%} of fp32" if share < 1 else f"{name} matmul runs {share:.1f}x fp32"


def _cpu_choice(purpose: Purpose, rates: dict[str, float], isa: str) -> tuple[str, str]:
    candidates = ("bf16",) if purpose == "training" else ("bf16", "fp16")
    for name in candidates:
        if rates.get(name, 0.0) >= FAST_RATIO * rates["fp32"]:
            return name, f"{_ratio_text(name, rates)} on this CPU: {isa}"
    return "fp32", f"{_ratio_text('bf16', rates)} on this CPU: {isa}"


def choose(requested: str | None, device: torch.device | str = "cpu", purpose: Purpose = "inference",
           option: str = "precision", warn: Callable[[str], None] | None = None,
           allowed: tuple[str, ...] | None = None) -> Precision:
    """Resolve a precision option for a device and purpose (see the module docstring for the rule).

    ``option`` names the option or config key in errors and warnings. ``allowed`` limits the names (the
    default: ``auto, fp32, bf16, fp16``, with ``fp16`` refused for training). A name given explicitly that runs
    far slower than fp32 here is kept, with a warning through ``warn`` (stderr by default).
    """
    device = torch.device(device)
    name = check(requested, purpose, option, allowed, device)
    if name == "int8":
        return Precision("int8", "int8", "dynamic int8 linear layers: approximate, opt-in", "cpu")
    if device.type == "cuda":
        if name == "auto":
            chosen, reason = _cuda_choice(device, purpose)
            return Precision(chosen, "auto", reason, device.type)
        return Precision(name, name, "as asked", device.type)
    if device.type != "cpu":  # mps, xpu, ...: no measurement; fp32 unless asked
        if name == "auto":
            return Precision("fp32", "auto", f"no measured rule for {device.type}", device.type)
        return Precision(name, name, "as asked", device.type)
    rates, isa = cpu_rates(), cpu_isa()
    if name == "auto":
        chosen, reason = _cpu_choice(purpose, rates, isa)
        return Precision(chosen, "auto", reason, "cpu")
    reason = "as asked"
    if name != "fp32" and rates.get(name, 0.0) < SLOW_RATIO * rates["fp32"]:
        reason = f"as asked; {_ratio_text(name, rates)} on this CPU: {isa}"
        (warn or _stderr)(f"warning: {option} {name} is slow on this CPU ({isa}): {rates.get(name, 0.0):.1f} GFLOP/s "
                          f"against {rates['fp32']:.1f} in fp32 ({_ratio_text(name, rates)}); running it as asked, "
                          f"'auto' would pick {_cpu_choice(purpose, rates, isa)[0]}")
    return Precision(name, name, reason, "cpu")


def check(requested: str | None, purpose: Purpose = "inference", option: str = "precision",
          allowed: tuple[str, ...] | None = None, device: torch.device | str | None = None) -> str:
    """The canonical name of a precision option, checked for its purpose (and device, when known) without measuring.

    One-line errors: an unknown name (listing the valid ones and naming ``option``), fp16 or int8 for training,
    int8 on a GPU.
    """
    if allowed is None:
        allowed = ("auto", "fp32", "bf16") if purpose == "training" else ("auto", *DTYPES)
    raw = "auto" if requested is None else _ALIASES.get(str(requested).strip().lower(), str(requested).strip().lower())
    if raw == "fp16" and purpose == "training" and "fp16" not in allowed:
        raise ConfigError(f"{option}: fp16 training needs loss scaling, which protlm does not do; use bf16 or fp32")
    if raw == "int8":
        _check_int8(torch.device(device or "cpu"), purpose, option)
    return canonical(requested, option, allowed)


def _check_int8(device: torch.device, purpose: Purpose, option: str) -> None:
    if purpose == "training":
        raise ConfigError(f"{option}: int8 is for CPU inference (embedding) only, not for training")
    if device.type != "cpu":
        raise ConfigError(f"{option}: int8 runs on CPUs only (dynamic quantisation); on {device.type} use auto, "
                          "bf16 or fp16")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
