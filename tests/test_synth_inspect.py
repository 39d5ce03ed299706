"""The built-in tiny model: deterministic, loadable, inspectable, and different per seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ggufopt_ray.gguf.inspect import inspect_model
from ggufopt_ray.gguf.synth import SynthSpec, write_synthetic_model
from ggufopt_ray.errors import UserError


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_synthetic_model(tmp_path / "a.gguf", SynthSpec(seed=3))
    b = write_synthetic_model(tmp_path / "b.gguf", SynthSpec(seed=3))
    c = write_synthetic_model(tmp_path / "c.gguf", SynthSpec(seed=4))
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    # Same vocabulary across seeds: candidates of different seeds stay comparable.
    assert inspect_model(a).vocab_fingerprint == inspect_model(c).vocab_fingerprint


def test_inspect_reports_what_the_spec_says(tiny_model):
    spec = SynthSpec(seed=0)
    info = inspect_model(tiny_model)
    d, ff, v, L = spec.n_embd, spec.n_ff, spec.n_vocab, spec.n_layer
    kv = d // spec.n_head * spec.n_head_kv
    per_layer = d * d * 2 + kv * d * 2 + 3 * d * ff + 2 * d
    expected_params = v * d * 2 + d + L * per_layer
    assert info.n_params == expected_params
    assert info.architecture == "llama"
    assert info.vocab_size == v
    assert info.context_length == spec.context_length
    assert info.file_type == "ALL_F32"
    assert info.tensor_bytes == 4 * expected_params
    assert info.bits_per_weight == pytest.approx(32.0)
    assert info.file_size == tiny_model.stat().st_size
    assert sum(s.count for s in info.by_type.values()) == 2 + 1 + 9 * L


def test_f16_model_bits_per_weight(tiny_model_f16):
    info = inspect_model(tiny_model_f16)
    assert info.file_type == "MOSTLY_F16"
    f16, f32 = info.by_type["F16"], info.by_type["F32"]
    assert f16.bits_per_weight == pytest.approx(16.0) and f32.bits_per_weight == pytest.approx(32.0)
    expected = (16 * f16.n_params + 32 * f32.n_params) / (f16.n_params + f32.n_params)
    assert info.bits_per_weight == pytest.approx(expected)


def test_every_weight_row_fits_k_quants(tiny_model):
    import gguf

    reader = gguf.GGUFReader(str(tiny_model))
    for t in reader.tensors:
        if len(t.shape) == 2:
            assert int(t.shape[0]) % 256 == 0, t.name  # ggml ne[0] = row length


def test_weights_differ_between_seeds(tmp_path):
    import gguf

    a = gguf.GGUFReader(str(write_synthetic_model(tmp_path / "a.gguf", SynthSpec(seed=1))))
    b = gguf.GGUFReader(str(write_synthetic_model(tmp_path / "b.gguf", SynthSpec(seed=2))))
    wa = {t.name: np.array(t.data) for t in a.tensors}
    wb = {t.name: np.array(t.data) for t in b.tensors}
    q = "blk.0.attn_q.weight"
    corr = np.corrcoef(wa[q].ravel(), wb[q].ravel())[0, 1]
    assert abs(corr) < 0.05, corr


def test_bad_spec_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="multiples of 256"):
        write_synthetic_model(tmp_path / "x.gguf", SynthSpec(n_embd=200))
    assert not (tmp_path / "x.gguf").exists()
