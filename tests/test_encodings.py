"""Baseline encodings: sizes, exactness where claimed, and the KLD error each one causes.

The error table uses broad synthetic distributions shaped like the trained model's in
../shared/models (n_vocab 8192, entropy ~4.6 nats, top-128 mass ~0.75-0.8) and candidates that
perturb and slightly flatten the logits at three strengths (mean KLD ~3e-5, ~4e-4, ~5e-3).
Run with -s to see it.
"""

import math

import numpy as np
import pytest

from ggufopt_ray.errors import UserError
from ggufopt_ray.metrics.encodings import ENCODINGS, LLAMA_CLAMP, get_encoding
from ggufopt_ray.metrics.kld import kld_per_token, log_softmax

V = 8192


def broad_logits(n, v, seed):
    rng = np.random.default_rng(seed)
    z = -1.15 * np.log(np.arange(1, v + 1))[None, :] + rng.standard_normal((n, v))
    z[:, 0] += rng.standard_normal(n)
    perm = rng.permuted(np.tile(np.arange(v), (n, 1)), axis=1)
    return (np.take_along_axis(z, perm, axis=1) + 3.0).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    n = 800
    logits = broad_logits(n, V, 0)
    rng = np.random.default_rng(1)
    cands = {}
    for name, sigma, flatten in (("Q8-like", 0.006, 0.002), ("Q6-like", 0.025, 0.005), ("Q4-like", 0.1, 0.01)):
        cands[name] = (logits * (1 - flatten) + sigma * rng.standard_normal((n, V))).astype(np.float32)
    base = log_softmax(logits)
    ref = rng.integers(0, V, n)
    exact = {k: kld_per_token(base, c, ref) for k, c in cands.items()}
    return base, ref, cands, exact


# Bounds on |mean KLD error| per encoding (the measured values are printed; see the module doc).
MEAN_ERROR_BOUND = {"exact": 0.0, "float16": 0.005, "llamacpp_uint16": 0.02, "compact": 0.01}


def test_encoding_error_table(data):
    base, ref, cands, exact = data
    llama_bytes = get_encoding("llamacpp_uint16").bytes_per_token(V)
    print(f"\nKLD error caused by each baseline encoding (n_vocab {V}, {len(ref)} tokens; "
          f"mean KLD {', '.join(f'{k} {v.kld.mean():.2e}' for k, v in exact.items())})")
    print(f"{'encoding':16s} {'bytes/tok':>9s} {'vs llama':>8s}  " +
          "  ".join(f"{k + ' mean err':>16s} {'median |tok err|':>16s}" for k in cands))
    for name, params in (("exact", {}), ("float16", {}), ("llamacpp_uint16", {}), ("topk", {"k": 128}),
                         ("topk", {"k": 1024}), ("compact", {})):
        enc = get_encoding(name, **params)
        encoded = enc.encode(base, ref)
        nbytes = sum(a.nbytes for a in encoded.values()) / len(ref)
        assert nbytes == enc.bytes_per_token(V)
        row = f"{name + (str(params['k']) if params else ''):16s} {nbytes:9.0f} {nbytes / llama_bytes:8.3f}  "
        for k, cand in cands.items():
            m = enc.kld_against(encoded, cand, ref)
            x = exact[k].kld.astype(np.float64)
            y = m.kld.astype(np.float64)
            mean_err = y.mean() / x.mean() - 1
            tok_err = np.median(np.abs(y - x) / x)
            row += f"{100 * mean_err:+15.3f}% {100 * tok_err:15.2f}%  "
            np.testing.assert_allclose(m.nll_cand, exact[k].nll_cand, rtol=1e-6)
            if name in MEAN_ERROR_BOUND:
                assert abs(mean_err) <= MEAN_ERROR_BOUND[name], (name, k, mean_err)
            if name == "topk":  # a coarsening: never above the full-vocabulary value
                assert np.all(y <= x * (1 + 1e-5) + 1e-9)
                assert mean_err < -0.01
            if name != "llamacpp_uint16":  # the others carry the exact base NLL of the reference token
                np.testing.assert_allclose(m.nll_base, exact[k].nll_base, rtol=1e-6)
            assert np.mean(m.same_top == exact[k].same_top) > 0.999
        print(row)
    assert get_encoding("compact").bytes_per_token(V) <= llama_bytes / 4


def test_exact_encoding_against_itself_is_exactly_zero(data):
    base, ref, _, _ = data
    enc = get_encoding("exact")
    m = enc.kld_against(enc.encode(base, ref), base, ref)
    assert np.all(m.kld == 0.0)


def test_corrected_encodings_against_the_base_itself_are_near_zero(data):
    base, ref, cands, exact = data
    for name in ("float16", "compact"):
        enc = get_encoding(name)
        m = enc.kld_against(enc.encode(base[:200], ref[:200]), base[:200], ref[:200])
        assert np.abs(m.kld).max() < 1e-6, name  # vs ~3e-5 for the best candidate above


def llama_reference_encode(row):
    """llama.cpp's log_softmax(n_vocab, logits, uint16_t*, tok), one row, as in the C++."""
    f32 = np.float32
    mx, mn = f32(row.max()), f32(row.min())
    mn = max(mn, f32(mx - f32(16)))
    sum_exp = 0.0
    for x in row:
        sum_exp += float(np.exp(f32(x - mx)))
    lse = f32(math.log(sum_exp))
    min_log_prob = f32(f32(mn - mx) - lse)
    scale = f32(f32(mx - mn) / f32(65535))
    inv = f32(f32(1) / scale)
    codes = [int(np.rint(f32(inv * f32(x - mn)))) if x > mn else 0 for x in row]
    return np.array(codes, np.uint16), scale, min_log_prob


def llama_reference_kld(codes, scale, min_log_prob, logits, tok):
    f32 = np.float32
    imax = int(np.argmax(logits))
    mx = f32(logits[imax])
    sum_exp = 0.0
    for x in logits:
        sum_exp += float(np.exp(f32(x - mx)))
    lse = f32(math.log(sum_exp))
    top = f32(mx + lse)
    total, best, ibase = 0.0, None, -1
    for i, (c, x) in enumerate(zip(codes, logits)):
        lpb = f32(f32(scale * f32(c)) + min_log_prob)
        if best is None or lpb > best:
            best, ibase = lpb, i
        if lpb > f32(-16):
            total += float(f32(np.exp(lpb) * f32(f32(lpb - x) + top)))
    nll = f32(top - logits[tok])
    nll_base = -f32(f32(scale * f32(codes[tok])) + min_log_prob)
    return total, float(imax == ibase), float(nll), float(nll_base)


def test_llamacpp_uint16_matches_the_cpp_formulas():
    rng = np.random.default_rng(8)
    v = 600
    logits = (3 * rng.standard_normal((4, v))).astype(np.float32)
    logits[0, :50] -= 40  # some entries more than 16 nats below the top: clamped, and skipped
    base = log_softmax(logits)
    cand = (logits + 0.2 * rng.standard_normal((4, v))).astype(np.float32)
    ref = rng.integers(0, v, 4)
    enc = get_encoding("llamacpp_uint16")
    encoded = enc.encode(base, ref)
    assert enc.bytes_per_token(v) == 2 * (v + 4)
    m = enc.kld_against(encoded, cand, ref)
    for i in range(4):
        codes, scale, minlp = llama_reference_encode(base[i])
        np.testing.assert_array_equal(encoded["codes"][i], codes)
        assert encoded["scale"][i] == scale and encoded["min_log_prob"][i] == minlp
        kld, same, nll, nll_base = llama_reference_kld(codes, scale, minlp, cand[i], ref[i])
        assert m.kld[i] == pytest.approx(kld, rel=2e-5)
        assert m.same_top[i] == same
        assert m.nll_cand[i] == pytest.approx(nll, rel=1e-6)
        assert m.nll_base[i] == pytest.approx(nll_base, rel=1e-6)
    decoded = enc.decode_logprobs(encoded)
    assert np.all(decoded[0, :50] <= -LLAMA_CLAMP + 1e-3)


def test_topk_with_the_whole_vocabulary_is_exact():
    rng = np.random.default_rng(9)
    logits = (2 * rng.standard_normal((6, 300))).astype(np.float32)
    cand = (logits + 0.3 * rng.standard_normal((6, 300))).astype(np.float32)
    base = log_softmax(logits)
    enc = get_encoding("topk", k=300)
    m = enc.kld_against(enc.encode(base), cand, np.zeros(6, int))
    np.testing.assert_allclose(m.kld, kld_per_token(base, cand).kld, rtol=1e-5)


@pytest.mark.parametrize("n_vocab,rows,bound", [(1024, 400, 0.05), (32000, 24, 0.01)])
def test_compact_fits_its_budget_at_other_vocabulary_sizes(n_vocab, rows, bound):
    # 1024 (the synthetic test model): only 86 tokens fit the 8-bit tier, so the error is larger
    logits = broad_logits(rows, n_vocab, 10)
    cand = (logits + 0.05 * np.random.default_rng(11).standard_normal(logits.shape)).astype(np.float32)
    base = log_softmax(logits)
    ref = np.arange(rows) * 7 % n_vocab
    enc = get_encoding("compact")
    encoded = enc.encode(base, ref)
    per_row = sum(a.nbytes for a in encoded.values()) / rows
    assert per_row == enc.bytes_per_token(n_vocab) <= get_encoding("llamacpp_uint16").bytes_per_token(n_vocab) / 4
    got = enc.kld_against(encoded, cand, ref).kld.astype(np.float64)
    want = kld_per_token(base, cand, ref).kld.astype(np.float64)
    print(f"\ncompact at n_vocab {n_vocab}: {per_row:.0f} bytes/token, mean KLD error "
          f"{100 * (got.mean() / want.mean() - 1):+.2f}% at mean KLD {want.mean():.1e}")
    assert abs(got.mean() / want.mean() - 1) < bound
    dec = enc.decode_logprobs(encoded, n_vocab)
    assert dec.shape == (rows, n_vocab)
    np.testing.assert_array_equal(dec.argmax(axis=1), base.argmax(axis=1))


def test_rows_can_be_sliced_like_a_store_does(data):
    base, ref, cands, _ = data
    cand = cands["Q6-like"]
    for name in ENCODINGS:
        enc = get_encoding(name)
        encoded = enc.encode(base[:60], ref[:60])
        assert all(a.shape[0] == 60 for a in encoded.values())
        whole = enc.kld_against(encoded, cand[:60], ref[:60])
        part = enc.kld_against({k: a[20:50] for k, a in encoded.items()}, cand[20:50], ref[20:50])
        np.testing.assert_allclose(part.kld, whole.kld[20:50], rtol=1e-6, atol=1e-12)


def test_registry():
    assert set(ENCODINGS) == {"exact", "float16", "llamacpp_uint16", "topk", "compact"}
    for name in ENCODINGS:
        enc = get_encoding(name)
        assert get_encoding(name, **enc.params()).params() == enc.params()
    assert get_encoding("topk", k=64).params() == {"k": 64}
    with pytest.raises(UserError):
        get_encoding("bzip")
    with pytest.raises(UserError):
        get_encoding("topk", kk=3)
    with pytest.raises(ValueError):
        get_encoding("compact").encode(np.zeros((2, 64), np.float32))  # too small a vocabulary
    with pytest.raises(ValueError):
        get_encoding("exact").encode(np.full((2, 64), -np.inf, np.float32))
