"""Shared fixtures: one synthetic tiny model per test session, made by the project itself."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path to the default synthetic model (seed 0, F32, 2 layers, vocab 1024, ctx 1024)."""
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    path = tmp_path_factory.mktemp("models") / "tiny-seed0-f32.gguf"
    return write_synthetic_model(path, SynthSpec(seed=0))


@pytest.fixture(scope="session")
def tiny_model_f16(tmp_path_factory):
    from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model

    path = tmp_path_factory.mktemp("models") / "tiny-seed0-f16.gguf"
    return write_synthetic_model(path, SynthSpec(seed=0, dtype="f16"))
