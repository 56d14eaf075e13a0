"""Shared fixtures: tiny odd-shaped configs (odd widths catch shape bugs) and paths to vendored real data."""

from __future__ import annotations

import os

import pytest
import torch

from protlm.config import T5Config
from protlm.precision import ENV_RATES

# Precision "auto" measures the CPU (protlm.precision). The suite stands in an AVX2 CPU without fast bf16 or fp16
# (rates as measured on an AMD Zen 3, GFLOP/s on one thread), so that every machine takes the same paths (fp32)
# and the results do not depend on the day's CPU; CLI tests in subprocesses inherit it. Tests of the decision
# itself set their own rates.
AVX2_RATES = "fp32:55,bf16:1.1,fp16:0.6"
os.environ[ENV_RATES] = AVX2_RATES

DATA = os.path.join(os.path.dirname(__file__), "data")
SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def odd_config(ffn: str = "gated-silu", tied: bool = False, **kw) -> T5Config:
    base = dict(vocab_size=256, d_model=40, d_kv=12, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj=ffn,
                tie_word_embeddings=tied, initializer_factor=0.5, protlm_family="ankh3")
    base.update(kw)
    return T5Config(**base)


@pytest.fixture
def tiny_config() -> T5Config:
    return odd_config()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def shared_data(*parts: str) -> str:
    """Path into ../shared/data; tests that need it skip when it is absent (a user's fresh clone)."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (benchmark data lives beside the repo, not in it)")
    return path


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tests of small models that opt in with ``usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
