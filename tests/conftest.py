"""Shared fixtures: one synthetic tiny model per test session, made by the project itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # keep Ray 2.60's token auth on in tests too


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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting Ray costs ~8-10 s here)."""
    import ray

    from ggufopt_ray.config import ClusterConfig
    from ggufopt_ray.distributed.runtime import start_ray

    info = start_ray(ClusterConfig(num_cpus=2, dashboard=False))
    yield info
    ray.shutdown()


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A module's own cache for the compiled kernels (engine/kld_native), with the kernel choice
    left to its default (auto); both settings are restored afterwards."""
    from ggufopt_ray.engine import kld_native

    old = {k: os.environ.get(k) for k in (kld_native.ENV_CACHE, kld_native.ENV_KERNEL)}
    os.environ[kld_native.ENV_CACHE] = str(tmp_path_factory.mktemp("kernels"))
    os.environ.pop(kld_native.ENV_KERNEL, None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def broad_logits(rng, n, v):
    """Zipf-like ranks plus noise, shuffled: broad next-token distributions like a trained LM's
    (float32 ``[n, v]``), the hard case for the compiled kernels."""
    z = -1.15 * np.log(np.arange(1, v + 1))[None, :] + rng.standard_normal((n, v))
    return np.take_along_axis(z, rng.permuted(np.tile(np.arange(v), (n, 1)), axis=1), axis=1).astype(np.float32) + 3


def small_sweep_config(cache_dir, **search):
    """A sweep config sized for tests: 4 evaluation chunks of 128 tokens, 2 concurrent trials."""
    from ggufopt_ray.config import SweepConfig

    cfg = SweepConfig()
    cfg.cache_dir = str(cache_dir)
    cfg.model.n_ctx = cfg.model.n_batch = cfg.model.n_ubatch = 128
    cfg.dataset.eval_chunks, cfg.dataset.calib_chunks = 4, 2
    cfg.metrics.early_stopping = False
    cfg.report = False  # plots cost seconds per sweep; the tests that read a report turn it on
    cfg.cluster.num_cpus, cfg.cluster.dashboard, cfg.cluster.max_concurrent_trials = 2, False, 2
    if "name" in search:  # each search has its own typed config
        from ggufopt_ray.searches import search_config

        cfg.search = search_config(search.pop("name"))
    for key, value in search.items():
        setattr(cfg.search, key, value)
    return cfg
