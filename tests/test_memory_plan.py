"""The trial memory plan adds up the buffers it names; checked against sums written out here."""

import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.memory_plan import (RUNTIME_OVERHEAD_BYTES, baseline_bytes, baseline_bytes_per_token,
                                             plan_trial_memory, predict_trial_peak_bytes)


def test_components_follow_the_formulas():
    v, ctx, layers, embd = 128256, 512, 2, 256
    plan = plan_trial_memory(10 << 20, ctx, v, layers, embd, "float16", row_block=1,
                             n_batch=512, n_ubatch=512, n_ff=768, threads=2)
    assert plan.model == 10 << 20
    assert plan.kv_cache == 2 * layers * ctx * embd * 2
    assert plan.llama_logits == 511 * v * 4
    assert plan.engine_rows == 511 * v * 4
    assert plan.baseline_payload == 511 * (2 * v + 4 + 4 + 4)  # float16 + correction + uint32 top id + ref
    assert plan.kld_temporaries == 2 * 6 * 1 * v * 4
    assert plan.runtime == RUNTIME_OVERHEAD_BYTES
    assert plan.total == sum(v for k, v in plan.to_dict().items() if k != "total")
    assert predict_trial_peak_bytes(10 << 20, ctx, v, layers, embd, "float16", 1, n_batch=512, n_ubatch=512,
                                    n_ff=768, threads=2) == plan.total


def test_baseline_bytes_per_encoding():
    v = 262144
    assert baseline_bytes_per_token("exact", v) == 4 * v
    assert baseline_bytes_per_token("llamacpp_uint16", v) == 2 * (v + 4)
    assert baseline_bytes_per_token("compact", v) <= baseline_bytes_per_token("llamacpp_uint16", v) // 4
    assert baseline_bytes("topk", v, 10, k=64) == 10 * (64 * 8 + 8)


def test_bigger_vocabularies_and_more_threads_need_more():
    small = predict_trial_peak_bytes(1 << 30, 512, 32000, 32, 4096)
    big = predict_trial_peak_bytes(1 << 30, 512, 262144, 32, 4096)
    assert big > small
    assert predict_trial_peak_bytes(1 << 30, 512, 262144, 32, 4096, threads=4) > big


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError):
        predict_trial_peak_bytes(1 << 30, 0, 32000, 32, 4096)
    with pytest.raises(UserError):
        predict_trial_peak_bytes(1 << 30, 512, 32000, 32, 4096, "nope")
