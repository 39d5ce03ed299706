"""The trial memory plan adds up the buffers it names; checked against sums written out here."""

import re

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


def test_refusal_names_settings_that_fit():
    """A baseline over the object store is refused; the chunk count it suggests fits, one more does not,
    and the encoding it suggests fits the original chunk count."""
    from ggufopt_ray.memory_plan import plan_sweep_memory, refuse_unless_fits
    from ggufopt_ray.tuning.bub import ModelDims

    dims = ModelDims(architecture="llama", n_vocab=262144, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
                     head_dim_k=128, head_dim_v=128, n_ff=14336, n_ctx_train=8192, file_size=16 << 30,
                     add_bos=True, bos_id=1)

    def plan(encoding, n_chunks):
        return plan_sweep_memory(encoding=encoding, n_chunks=n_chunks, n_ctx=512, first=256, dims=dims,
                                 model_bytes=16 << 30, n_batch=512, n_ubatch=512, kld_threads=1,
                                 object_store_bytes=8 << 30, node_memory_bytes=64 << 30, concurrency=2)

    big = plan("float16", 100)  # 100 x 255 x (2 x 262144 + ...) bytes: ~12.5 GiB > 8 GiB
    assert big.baseline_bytes >= 100 * 255 * 2 * 262144 > big.object_store_bytes
    with pytest.raises(UserError, match=r"float16 baseline needs 12\.\d+ GiB.*use metrics\.encoding=compact, "
                                        r"dataset\.eval_chunks<=(\d+)") as err:
        refuse_unless_fits(big, n_chunks=100, dims=dims)
    n = int(re.search(r"eval_chunks<=(\d+)", str(err.value)).group(1))
    refuse_unless_fits(plan("float16", n), n_chunks=n, dims=dims)  # fits
    with pytest.raises(UserError):
        refuse_unless_fits(plan("float16", n + 1), n_chunks=n + 1, dims=dims)
    refuse_unless_fits(plan("compact", 100), n_chunks=100, dims=dims)  # the suggested encoding fits
    # A trial that cannot fit the node's memory is refused too
    tight = plan_sweep_memory(encoding="compact", n_chunks=10, n_ctx=512, first=256, dims=dims,
                              model_bytes=16 << 30, n_batch=512, n_ubatch=512, kld_threads=1,
                              object_store_bytes=8 << 30, node_memory_bytes=8 << 30, concurrency=2)
    with pytest.raises(UserError, match=r"one trial needs ~\d+\.\d+ GiB and 8\.00 GiB are available; lower model\.n_batch"):
        refuse_unless_fits(tight, n_chunks=10, dims=dims)
