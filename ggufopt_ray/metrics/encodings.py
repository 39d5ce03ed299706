"""How the baseline's log-probabilities are kept, and the KL divergence each way of keeping allows.

The baseline is computed once and compared with every candidate, so its size decides how many
chunks a sweep can afford: float32 log-probs cost 4·n_vocab bytes per scored token (the original
toolkit kept full float32 logits), llama.cpp's KLD base file 2·n_vocab+8. Each encoding turns
``[n, V]`` baseline log-probs into a dict of per-row numpy arrays (every array's first axis is the
row, so a store can write, slice and concatenate them) and computes per-token metrics against a
candidate's raw logits from that dict alone.

=================  ===============================  ============================================
name               bytes per scored token           KLD computed as
=================  ===============================  ============================================
exact              4 V                              full vocabulary, exact (kld.kld_per_token)
float16            2 V + 4 + id bytes (+4)          full vocabulary, cross-entropy corrected
llamacpp_uint16    2 (2 ceil(V/2) + 4)              llama.cpp's formula: uint16 codes 16 nats
                                                    below the top, terms with log p <= -16 skipped
topk (k=128)       k (4 + id bytes) + 4 (+4)        top-k tokens + one "rest" bucket (a lower
                                                    bound of the true KLD)
compact            <= 1/4 of llamacpp_uint16        tiered codes, cross-entropy corrected
=================  ===============================  ============================================

(+4): the exact log-prob of the reference token, stored when ``encode`` is given ``ref_tokens``
(then the base NLL and Δp are exact; without it they are decoded, approximately).

Cross-entropy correction
------------------------
With a decoded approximation p~ of the base distribution p, the plug-in KL(p~ || q) is off by
KL(p~ || p) + sum (p~ - p) log(p/q): the first term is a bias the same size for every candidate
and it swamps small divergences (a Q8_0 has KLD ~1e-5 on a small model). At encode time the true
log-probs are known, so the encodings marked "corrected" store one float per row,
``xent_correction = sum p~ (log p - log p~)``, and report ``KL(p~ || q) + xent_correction =
sum p~ (log p - log q)``. The error left is ``sum (p~ - p)(log q - log p)``: a product of the
encoding error and the candidate's own deviation, with no bias of its own. A distribution compared
with itself then gives 0 up to rounding.

The compact encoding (fixed size per row, <= 1/4 of llama.cpp's)
-----------------------------------------------------------------
Per row, with log-probs relative to the row maximum and tokens ranked by probability:

- top T tokens (T = 32 for V >= 8192): explicit ids and a 16-bit code of the log-prob;
- the next tokens down to rank K: an 8-bit code each, stored in vocabulary order (no ids);
- every token: a 3-bit code in vocabulary order, 7 meaning "ranked <= K" and 0..6 a coarse level
  at fixed offsets ``COMPACT_LEVELS`` below the log-prob of rank K+1 (denser near the top, where
  the mass is);
- the coarse levels' probabilities are tilted, ``exp(a + b * level)``, with a and b chosen at encode
  time so that the coarse part keeps its exact mass and its exact mean log-prob: an error that
  varies linearly with log p (a candidate that flattens or sharpens the distribution) then
  cancels; plus the cross-entropy correction and the exact log-prob of the reference token.

K is whatever fills the budget: about V/8 - 150 (870 of 8192 tokens, ~90% of the mass on the
trained model in ../shared/models). Measured on that model's distributions (6096 scored tokens,
logits from a numpy re-implementation of its forward pass; candidates with numpy block-quantized
weights, Q8_0-, Q6- and Q4_0-like, mean KLD 1.7e-5, 2.7e-4, 5.5e-3): mean-KLD error +0.09%,
-0.005%, +0.02% (over 3000 of those tokens: +0.35%, +0.05%, +0.004%); median per-token error
5.7%, 1.5%, 0.3% of the token's KLD. So the mean (and mean-based ranking) is kept well within 1%,
while per-token values, hence the percentiles, of very good candidates are less exact (p99 within
~2%). llama.cpp's own format (4x the size) did worse on the Q8_0-like candidate: -0.2 to -0.9%
on the mean, ~30% median per-token error, because it skips every term below -16 and its rounding
bias is not corrected. tests/test_encodings.py prints the same table on synthetic distributions.
"""

from __future__ import annotations

import math

import numpy as np

from ggufopt_ray.metrics.kld import (BLOCK_ELEMENTS, TokenMetrics, _rowsum, array_loader, compare_rows,
                                     kld_per_token, rows_per_block)
from ggufopt_ray.metrics.row_blocks import run_row_blocks


# ----------------------------------------------------------------------------- helpers

def _id_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 65536 else np.uint32


def _check_logprobs(logprobs) -> np.ndarray:
    x = np.asarray(logprobs)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"baseline log-probs must be [n_tokens, n_vocab>=2], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("baseline log-probs must be finite (clamp -inf to a very negative value first)")
    return x


def _check_ref(ref_tokens, n: int, v: int) -> np.ndarray | None:
    if ref_tokens is None:
        return None
    ref = np.asarray(ref_tokens).astype(np.int64).reshape(-1)
    if ref.shape[0] != n:
        raise ValueError(f"{ref.shape[0]} reference tokens for {n} rows")
    if n and (ref.min() < 0 or ref.max() >= v):
        raise ValueError(f"reference token ids must lie in [0, {v})")
    return ref


def _blocks(n: int, v: int):
    step = max(1, BLOCK_ELEMENTS // v)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _normalized64(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def _cand_lse(b: np.ndarray) -> np.ndarray:
    """log-sum-exp of float32 candidate logit rows, accumulated in float64."""
    b = np.ascontiguousarray(b, dtype=np.float32)
    m = b.max(axis=1)
    return m.astype(np.float64) + np.log(_rowsum(np.exp(b - m[:, None])))


def _with_ref_extras(m: TokenMetrics, nll_base: np.ndarray) -> TokenMetrics:
    """Replace the base NLL (and Δp) decoded from an encoding by the exact stored value."""
    m.nll_base[:] = nll_base
    m.delta_p[:] = np.exp(-m.nll_cand.astype(np.float64)) - np.exp(-np.asarray(nll_base, np.float64))
    return m


class BaselineEncoding:
    """Base class: encode baseline log-probs, and compare a candidate with the encoded rows."""

    name = ""

    def params(self) -> dict:
        """Constructor parameters (JSON-safe), so ``get_encoding(name, **params)`` rebuilds it."""
        return {}

    def encode(self, logprobs: np.ndarray, ref_tokens: np.ndarray | None = None, *,
               threads: int = 1) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode_logits(self, logits: np.ndarray, ref_tokens: np.ndarray | None = None, *,
                      threads: int = 1) -> dict[str, np.ndarray]:
        """``encode(log_softmax(logits))`` from raw float32 logit rows, which are only read (a
        view of llama.cpp's output buffer will do). The baseline pass calls this once per chunk;
        encodings that can fuse the log-softmax into their own row-block pass override it."""
        from ggufopt_ray.metrics.kld import log_softmax

        return self.encode(log_softmax(logits), ref_tokens, threads=threads)

    def bytes_per_token(self, n_vocab: int, with_ref: bool = True) -> int:
        """Bytes stored per scored token (all arrays of one row), not counting token ids."""
        raise NotImplementedError

    def decode_logprobs(self, encoded: dict, n_vocab: int | None = None) -> np.ndarray:
        """Dense float32 ``[n, V]`` log-probs as the encoding sees them (for inspection).

        n_vocab is needed by the encodings whose arrays do not show it (topk, compact)."""
        raise NotImplementedError

    def kld_against(self, encoded: dict, candidate_logits: np.ndarray,
                    ref_tokens: np.ndarray | None = None, *, threads: int = 1) -> TokenMetrics:
        """Per-token metrics of candidate logits ``[n, V]`` against encoded baseline rows.

        The candidate rows are read in row blocks (never converted or copied whole), shared among
        ``threads`` threads; the results do not depend on the thread count."""
        raise NotImplementedError

    def compare(self, encoded: dict, candidate_logits: np.ndarray,
                ref_tokens: np.ndarray | None = None, *, threads: int = 1) -> TokenMetrics:
        return self.kld_against(encoded, candidate_logits, ref_tokens, threads=threads)

    @staticmethod
    def n_rows(encoded: dict) -> int:
        return int(next(iter(encoded.values())).shape[0])


# ----------------------------------------------------------------------------- exact, float16

class ExactEncoding(BaselineEncoding):
    """float32 log-probs; the reference for the others."""

    name = "exact"

    def encode(self, logprobs, ref_tokens=None, *, threads: int = 1):
        return {"logprobs": np.ascontiguousarray(_check_logprobs(logprobs), dtype=np.float32)}

    def bytes_per_token(self, n_vocab, with_ref=True):
        return 4 * n_vocab

    def decode_logprobs(self, encoded, n_vocab=None):
        return np.asarray(encoded["logprobs"], np.float32)

    def kld_against(self, encoded, candidate_logits, ref_tokens=None, *, threads=1):
        return kld_per_token(encoded["logprobs"], candidate_logits, ref_tokens, threads=threads)


_F16_TINY = np.float32(2.0 ** -14)  # smallest normal float16; below it the spacing is fixed (2^-24)
_F16_MAX = np.float32(65504.0)  # largest float16


def _round_float16(x: np.ndarray, codes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """float16 rounding (to nearest even) of C-contiguous float32 rows ``x`` whose values lie in
    [-65504, -2^-14]: the float16 bit patterns go to ``codes`` (uint16) and the rounded values,
    as float32, are returned (a view of the uint32 scratch ``u``).

    numpy's float16 casts are scalar code, here ~7 ns per value to float16 and ~3.5 back, more
    than the rest of the encoding together; these integer ufuncs do both in ~1.5 ns. In that range
    a float16 is a float32 with the mantissa cut to 10 bits and the exponent rebiased, both plain
    bit arithmetic. The caller fixes values outside the range (positive, near 0, or below -65504).
    """
    b = x.view(np.uint32)
    np.right_shift(b, 13, out=u)
    np.bitwise_and(u, 1, out=u)  # round half to even: the kept mantissa's last bit
    u += 0xFFF
    u += b
    np.bitwise_and(u, 0xFFFFE000, out=u)  # the rounded float32 (a carry may bump the exponent)
    # float16 bits: sign | exponent - 112 | mantissa. In 16-bit arithmetic the low bits of
    # (u >> 13) - (112 << 10) are those of (u >> 13) - 0xC000; the sign is set after.
    np.right_shift(u, 13, out=codes, casting="unsafe")
    codes -= np.uint16(0xC000)
    codes |= np.uint16(0x8000)  # every value in range is negative
    return u.view(np.float32)


def _sum_rows(x: np.ndarray) -> np.ndarray:
    """Row sums of a C-contiguous float32 block, as float64: numpy's pairwise summation (~1e-8
    relative here). Not BLAS: the encoder's threads call it concurrently, and OpenBLAS would run
    each call on its own thread pool, whose spinning threads then slow the next decode (~10%
    measured on 2 cores). Only the log-softmax normalizer goes through kld's BLAS ``_rowsum``,
    because ``kld.log_softmax`` uses it and the codes must match that function's log-probs."""
    return np.add.reduce(x, axis=1).astype(np.float64)


class Float16Encoding(BaselineEncoding):
    """float16 log-probs plus the cross-entropy correction (one float32 per row).

    Encoding is one pass over row blocks of float32 work (no float64 arrays, no float16 casts
    but for a few values per row): at a 49k vocabulary it runs once per decoded chunk, so it must
    cost a fraction of a decode. The codes are the float16 rounding of the float32 log-probs x
    (``encode_logits`` computes x exactly as ``kld.log_softmax`` does, so both entry points store
    the same codes). The correction needs no second exponential: with d = x - code (exact in
    float32: the rounding keeps x's own last bits) and p = softmax(x),

        xent_correction = sum p~ (log p - log p~) = N / (1 + w) + log1p(w),
        N = sum p d e^-d,  w = sum p (e^-d - 1)      (p~ = softmax(code) = p e^-d / (1 + w)),

    evaluated in float64 from the moments M_k = sum p d^k, k = 1..4 (|d| <= 2^-9 where the mass
    is, so the dropped d^5 terms are ~1e-8 of the correction). M_1 enters N and w with opposite
    signs and cancels exactly, so no first-order rounding is left in a value of order d^2. The
    row's top term of the softmax sum (exactly 1) is kept out of the float32 partial sums, so the
    reference token's log-prob x[ref] - logsumexp(x) keeps its precision near 0. Against a
    long-double evaluation: correction within ~1e-12 absolute, ref log-prob within float32
    rounding of x.

    Where the compiled encoder is available (``float16_encoder()``: engine/f16_kernel.c, the same
    definitions in three passes per row, ~6x faster), it encodes instead; its codes are float16 of
    the compiled ``kld.log_softmax``, as this code's are of the numpy one.
    """

    name = "float16"

    def encode(self, logprobs, ref_tokens=None, *, threads: int = 1):
        return self._encode(logprobs, ref_tokens, threads, from_logits=False)

    def encode_logits(self, logits, ref_tokens=None, *, threads: int = 1):
        return self._encode(logits, ref_tokens, threads, from_logits=True)

    def _encode(self, rows, ref_tokens, threads, from_logits: bool):
        x_all = np.asarray(rows)
        if x_all.ndim != 2 or x_all.shape[1] < 2:
            raise ValueError(f"baseline log-probs must be [n_tokens, n_vocab>=2], got shape {x_all.shape}")
        n, v = x_all.shape
        ref = _check_ref(ref_tokens, n, v)
        native = float16_encoder()
        if native is not None:
            got = native(x_all, ref, from_logits, threads)
            if got is not None:
                got["top_id"] = got["top_id"].astype(_id_dtype(v))
                return got
            # a bad row: the numpy code below finds it and says which
        codes = np.empty((n, v), np.float16)
        corr = np.empty(n, np.float32)
        top_id = np.empty(n, _id_dtype(v))
        ref_lp = np.empty(n, np.float32) if ref is not None else None
        step = max(1, BLOCK_ELEMENTS // v)  # kld.log_softmax's blocks: same BLAS calls, same sums
        bad = []

        def work(blocks):
            with np.errstate(invalid="ignore", over="ignore"):  # bad rows are reported below
                encode_blocks(blocks)

        def encode_blocks(blocks):
            rows_max = min(step, n)
            z, e = np.empty((rows_max, v), np.float32), np.empty((rows_max, v), np.float32)
            u = np.empty((rows_max, v), np.uint32)
            for r0, r1 in blocks:
                k = r1 - r0
                at = np.arange(k)
                xb = np.ascontiguousarray(x_all[r0:r1], dtype=np.float32)
                top = xb.argmax(axis=1)
                m = xb[at, top]
                np.subtract(xb, m[:, None], out=z[:k])
                np.exp(z[:k], out=e[:k])
                if from_logits:  # x = z - log(sum e), as kld.log_softmax computes it
                    log_sum32 = np.log(_rowsum(e[:k])).astype(np.float32)
                    x = np.subtract(z[:k], log_sum32[:, None], out=z[:k])
                else:
                    x = xb
                cb = codes[r0:r1].view(np.uint16)
                c = _round_float16(x, cb, u[:k])
                # values the bit arithmetic does not cover: near 0 or positive (only where the
                # row's top is), beyond -65504 (only where its minimum is): numpy's cast
                x_top = x[at, top]
                for r in np.flatnonzero((x_top > -_F16_TINY) | (x.min(axis=1) < -_F16_MAX)):
                    fix = np.flatnonzero((x[r] > -_F16_TINY) | (x[r] < -_F16_MAX))
                    codes[r0 + r, fix] = x[r, fix]
                    c[r, fix] = codes[r0 + r, fix]
                d = np.subtract(x, c, out=c)  # exact: c is x with its last mantissa bits dropped
                d_top = d[at, top].astype(np.float64)
                e[at, top] = 0.0  # the top's exp(0) = 1 is added in float64
                rest = _sum_rows(e[:k])
                s = 1.0 + rest
                mom = []
                for power in range(1, 5):  # M_k = (sum e d^k + d_top^k) / s
                    np.multiply(e[:k], d, out=e[:k])
                    mom.append((_sum_rows(e[:k]) + d_top ** power) / s)
                m1, m2, m3, m4 = mom
                num = m1 - m2 + m3 / 2 - m4 / 6
                w = -m1 + m2 / 2 - m3 / 6 + m4 / 24
                c_row = num / (1 + w) + np.log1p(w)
                if not np.isfinite(c_row).all():
                    bad.append(r0 + int(np.flatnonzero(~np.isfinite(c_row))[0]))
                corr[r0:r1] = c_row
                top_id[r0:r1] = top
                if ref_lp is not None:
                    # logsumexp(x): m + log(s) for given log-probs; for x made here from z,
                    # log(s) - log_sum32 (x's top is exactly -log_sum32)
                    lse = np.log1p(rest) - log_sum32 if from_logits else m + np.log1p(rest)
                    ref_lp[r0:r1] = x[at, ref[r0:r1]] - lse

        run_row_blocks(n, step, threads, work)
        if bad:
            what = "logits" if from_logits else "log-probs"
            raise ValueError(f"baseline {what} must be finite, and log-probs above float16's -65504 "
                             f"(row {min(bad)} is not); clamp -inf to a very negative value first")
        # the argmax is stored because the top two log-probs may round to the same float16
        out = {"logprobs": codes, "xent_correction": corr, "top_id": top_id}
        if ref_lp is not None:
            out["ref_logprob"] = ref_lp
        return out

    def bytes_per_token(self, n_vocab, with_ref=True):
        return 2 * n_vocab + 4 + np.dtype(_id_dtype(n_vocab)).itemsize + (4 if with_ref else 0)

    def decode_logprobs(self, encoded, n_vocab=None):
        return np.asarray(encoded["logprobs"], np.float32)

    def kld_against(self, encoded, candidate_logits, ref_tokens=None, *, threads=1):
        codes = encoded["logprobs"]
        if candidate_logits.shape != codes.shape:
            raise ValueError(f"candidate logits {candidate_logits.shape} do not match the encoded rows {codes.shape}")
        # the stored argmax picks the shift and decides same_top, saving a pass over the base rows
        m = compare_rows(array_loader(codes), candidate_logits, ref_tokens,
                         base_top=np.asarray(encoded["top_id"]), threads=threads)
        m.kld[:] = m.kld.astype(np.float64) + encoded["xent_correction"]
        if ref_tokens is not None and "ref_logprob" in encoded:
            _with_ref_extras(m, -np.asarray(encoded["ref_logprob"], np.float64))
        return m


# ----------------------------------------------------------------------------- llama.cpp uint16

LLAMA_CLAMP = 16.0  # nats below the row maximum that llama.cpp keeps; also its KLD term threshold


class LlamaCppUint16Encoding(BaselineEncoding):
    """llama-perplexity's KLD base format and KLD formula, reproduced in float32 like its C++.

    Per row: ``scale`` and ``min_log_prob`` (float32) and one uint16 code per vocabulary entry;
    log p = scale * code + min_log_prob, everything 16 nats or more below the top is code 0.
    KLD sums p_base (log p_base - log q) over entries with log p_base > -16 only, so it is not
    exactly 0 for a model against itself and can be slightly negative (as in llama.cpp).
    """

    name = "llamacpp_uint16"

    def encode(self, logprobs, ref_tokens=None, *, threads: int = 1):
        x = _check_logprobs(logprobs)
        n, v = x.shape
        codes = np.zeros((n, v), np.uint16)
        scale = np.empty(n, np.float32)
        minlp = np.empty(n, np.float32)
        for r0, r1 in _blocks(n, v):
            lg = np.asarray(x[r0:r1], np.float32)
            mx = lg.max(axis=1)
            mn = np.maximum(lg.min(axis=1), mx - np.float32(LLAMA_CLAMP))
            sum_exp = np.exp(lg - mx[:, None]).sum(axis=1, dtype=np.float64)
            lse = np.log(sum_exp).astype(np.float32)
            minlp[r0:r1] = (mn - mx) - lse
            sc = ((mx - mn) / np.float32(65535)).astype(np.float32)
            scale[r0:r1] = sc
            with np.errstate(divide="ignore"):
                inv = np.where(sc > 0, np.float32(1) / sc, np.float32(0)).astype(np.float32)
            q = np.rint(inv[:, None] * (lg - mn[:, None]))
            codes[r0:r1] = np.where(lg > mn[:, None], q, 0).astype(np.uint16)
        return {"codes": codes, "scale": scale, "min_log_prob": minlp}

    def bytes_per_token(self, n_vocab, with_ref=True):
        return 2 * (2 * ((n_vocab + 1) // 2) + 4)

    @staticmethod
    def _decode_block(encoded, r0, r1):
        sc = np.asarray(encoded["scale"][r0:r1], np.float32)
        mn = np.asarray(encoded["min_log_prob"][r0:r1], np.float32)
        return sc[:, None] * np.asarray(encoded["codes"][r0:r1]).astype(np.float32) + mn[:, None]

    def decode_logprobs(self, encoded, n_vocab=None):
        n, v = encoded["codes"].shape
        out = np.empty((n, v), np.float32)
        for r0, r1 in _blocks(n, v):
            out[r0:r1] = self._decode_block(encoded, r0, r1)
        return out

    def kld_against(self, encoded, candidate_logits, ref_tokens=None, *, threads=1):
        codes = encoded["codes"]
        n, v = codes.shape
        if candidate_logits.shape != (n, v):
            raise ValueError(f"candidate logits {candidate_logits.shape} do not match the encoded rows {(n, v)}")
        ref = _check_ref(ref_tokens, n, v)
        out = {k: np.full(n, np.nan, np.float32) for k in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}
        run_row_blocks(n, rows_per_block(v), threads,
                       lambda blocks: [self._kld_block(encoded, candidate_logits, ref, out, r0, r1) for r0, r1 in blocks])
        return TokenMetrics(**out)

    def _kld_block(self, encoded, candidate_logits, ref, out, r0, r1):
        """Rows r0:r1 of kld_against, written into ``out``."""
        rows = np.arange(r1 - r0)
        lpb = self._decode_block(encoded, r0, r1)
        b = np.ascontiguousarray(candidate_logits[r0:r1], dtype=np.float32)
        imax = b.argmax(axis=1)
        mx = b[rows, imax]
        sum_exp = np.exp(b - mx[:, None]).sum(axis=1, dtype=np.float64)
        lse = np.log(sum_exp).astype(np.float32)
        top = mx + lse  # max_logit += log_sum_exp
        terms = np.exp(lpb) * ((lpb - b) + top[:, None])
        out["kld"][r0:r1] = np.where(lpb > np.float32(-LLAMA_CLAMP), terms, 0).sum(axis=1, dtype=np.float64)
        out["same_top"][r0:r1] = lpb.argmax(axis=1) == imax
        if ref is not None:
            tok = ref[r0:r1]
            nll = (mx + lse) - b[rows, tok]
            nll_base = -lpb[rows, tok]
            out["nll_cand"][r0:r1] = nll
            out["nll_base"][r0:r1] = nll_base
            out["delta_p"][r0:r1] = np.exp(-nll) - np.exp(-nll_base)


# ----------------------------------------------------------------------------- top-k + tail

class TopKEncoding(BaselineEncoding):
    """The k most probable tokens (ids + float32 log-probs) and the log of the remaining mass.

    KLD is taken between the coarsened distributions (k tokens + one "rest" bucket), which is a
    lower bound of the full-vocabulary KLD (data-processing inequality): it misses how the
    candidate redistributes mass inside the rest, a real loss on broad distributions.
    """

    name = "topk"

    def __init__(self, k: int = 128):
        if int(k) < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        self.k = int(k)

    def params(self):
        return {"k": self.k}

    def encode(self, logprobs, ref_tokens=None, *, threads: int = 1):
        x = _check_logprobs(logprobs)
        n, v = x.shape
        k = min(self.k, v)
        ref = _check_ref(ref_tokens, n, v)
        ids = np.empty((n, k), _id_dtype(v))
        vals = np.empty((n, k), np.float32)
        tail = np.empty(n, np.float32)
        for r0, r1 in _blocks(n, v):
            lp = _normalized64(x[r0:r1])
            part = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < v else np.tile(np.arange(v), (r1 - r0, 1))
            top = np.take_along_axis(lp, part, axis=1)
            order = np.argsort(-top, axis=1, kind="stable")
            part = np.take_along_axis(part, order, axis=1)
            ids[r0:r1] = part
            vals[r0:r1] = np.take_along_axis(top, order, axis=1)
            rest = lp.copy()
            np.put_along_axis(rest, part, -np.inf, axis=1)
            m = rest.max(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                t = m[:, 0] + np.log(np.exp(rest - np.where(np.isfinite(m), m, 0)).sum(axis=1))
            tail[r0:r1] = np.where(np.isfinite(m[:, 0]), t, -np.inf)
        out = {"ids": ids, "logprobs": vals, "log_tail": tail}
        if ref is not None:
            out["ref_logprob"] = _normalized_ref(x, ref)
        return out

    def bytes_per_token(self, n_vocab, with_ref=True):
        k = min(self.k, n_vocab)
        return k * (4 + np.dtype(_id_dtype(n_vocab)).itemsize) + 4 + (4 if with_ref else 0)

    def decode_logprobs(self, encoded, n_vocab=None):
        """Top-k log-probs, and the rest's mass spread evenly over the other tokens."""
        if n_vocab is None:
            raise ValueError("topk.decode_logprobs needs n_vocab")
        ids, vals, tail = encoded["ids"], encoded["logprobs"], encoded["log_tail"]
        n, k = ids.shape
        out = np.empty((n, int(n_vocab)), np.float32)
        out[:] = (np.asarray(tail, np.float64) - math.log(max(int(n_vocab) - k, 1)))[:, None]
        np.put_along_axis(out, np.asarray(ids).astype(np.int64), vals, axis=1)
        return out

    def kld_against(self, encoded, candidate_logits, ref_tokens=None, *, threads=1):
        ids = np.asarray(encoded["ids"]).astype(np.int64)
        vals = np.asarray(encoded["logprobs"], np.float64)
        tail = np.asarray(encoded["log_tail"], np.float64)
        n, k = ids.shape
        if candidate_logits.ndim != 2 or candidate_logits.shape[0] != n:
            raise ValueError(f"candidate logits {candidate_logits.shape} do not match {n} encoded rows")
        v = candidate_logits.shape[1]
        ref = _check_ref(ref_tokens, n, v)
        out = {key: np.full(n, np.nan, np.float32) for key in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}

        def block(r0, r1):
            rows = np.arange(r1 - r0)
            b = np.ascontiguousarray(candidate_logits[r0:r1], dtype=np.float32)
            lse = _cand_lse(b)
            tid = ids[r0:r1]
            lq_top = np.take_along_axis(b, tid, axis=1).astype(np.float64) - lse[:, None]
            kl = (np.exp(vals[r0:r1]) * (vals[r0:r1] - lq_top)).sum(axis=1)
            if k < v:
                rest = b.copy()
                np.put_along_axis(rest, tid, -np.inf, axis=1)
                lq_tail = _cand_lse(rest) - lse
                pt = tail[r0:r1]
                kl += np.where(np.isfinite(pt), np.exp(pt) * (pt - lq_tail), 0.0)
            out["kld"][r0:r1] = kl
            out["same_top"][r0:r1] = b.argmax(axis=1) == tid[:, 0]
            if ref is not None:
                tok = ref[r0:r1]
                nll_c = lse - b[rows, tok]
                out["nll_cand"][r0:r1] = nll_c
                if "ref_logprob" in encoded:
                    lpb = np.asarray(encoded["ref_logprob"][r0:r1], np.float64)
                else:  # the token's own log-prob if it is among the top k, else a uniform share of the rest
                    hit = tid == tok[:, None]
                    rest_share = tail[r0:r1] - math.log(max(v - k, 1))
                    lpb = np.where(hit.any(axis=1), (vals[r0:r1] * hit).sum(axis=1), rest_share)
                out["nll_base"][r0:r1] = -lpb
                out["delta_p"][r0:r1] = np.exp(-nll_c) - np.exp(lpb)

        run_row_blocks(n, rows_per_block(v), threads, lambda blocks: [block(r0, r1) for r0, r1 in blocks])
        return TokenMetrics(**out)


def _normalized_ref(x, ref: np.ndarray) -> np.ndarray:
    n, v = x.shape
    out = np.empty(n, np.float32)
    for r0, r1 in _blocks(n, v):
        lp = _normalized64(x[r0:r1])
        out[r0:r1] = lp[np.arange(r1 - r0), ref[r0:r1]]
    return out


# ----------------------------------------------------------------------------- compact

# Coarse levels: offsets (nats) below the log-prob of rank K+1. Chosen on the trained model's
# distributions (denser near the top, where the mass is); the tilt fit absorbs a shape mismatch.
COMPACT_LEVELS = (0.2, 0.6, 1.1, 1.7, 2.5, 3.6, 5.5)
_N_LEVELS = len(COMPACT_LEVELS)
_REFINED = 7  # 3-bit code of a token ranked <= K
_HEADER = ("row_max", "mid_floor", "anchor", "tilt_a", "tilt_b", "xent_correction")
# A token's level is the number of these midpoints its distance below the anchor exceeds.
_LEVEL_MIDS = tuple(0.5 * (lo + hi) for lo, hi in zip(COMPACT_LEVELS, COMPACT_LEVELS[1:]))


def _pack3(codes: np.ndarray) -> np.ndarray:
    """[r, V] codes 0..7 -> [r, ceil(3V/8)] bytes: each code's 3 bits, most significant first,
    back to back (np.packbits' layout), built 8 codes = 24 bits = 3 bytes at a time."""
    r, v = codes.shape
    v8 = -(-v // 8) * 8
    if v8 != v:
        codes = np.concatenate([codes, np.zeros((r, v8 - v), np.uint8)], axis=1)
    c = np.asarray(codes, np.uint8).reshape(r, v8 // 8, 8)
    word = c[:, :, 0].astype(np.uint32) << np.uint32(21)
    for i in range(1, 8):
        word |= c[:, :, i].astype(np.uint32) << np.uint32(21 - 3 * i)
    out = np.empty((r, v8 // 8, 3), np.uint8)
    np.right_shift(word, np.uint32(16), out=out[:, :, 0], casting="unsafe")
    np.right_shift(word, np.uint32(8), out=out[:, :, 1], casting="unsafe")
    np.copyto(out[:, :, 2], word, casting="unsafe")
    return out.reshape(r, 3 * v8 // 8)[:, : (3 * v + 7) // 8]


def _words24(packed: np.ndarray, v: int) -> np.ndarray:
    """[r, ceil(V/8)] uint32: the 24 bits of each group of 8 codes."""
    r = packed.shape[0]
    v8 = -(-v // 8) * 8
    p = np.asarray(packed)
    if p.shape[1] != 3 * v8 // 8:
        p = np.concatenate([p, np.zeros((r, 3 * v8 // 8 - p.shape[1]), np.uint8)], axis=1)
    b = p.reshape(r, v8 // 8, 3)
    word = b[:, :, 0].astype(np.uint32) << np.uint32(16)
    word |= b[:, :, 1].astype(np.uint32) << np.uint32(8)
    word |= b[:, :, 2]
    return word


def _unpack3(packed: np.ndarray, v: int) -> np.ndarray:
    word = _words24(packed, v)
    r, g = word.shape
    out = np.empty((r, g, 8), np.uint8)
    for i in range(8):
        np.bitwise_and(word >> np.uint32(21 - 3 * i), np.uint32(7), out=out[:, :, i], casting="unsafe")
    return out.reshape(r, 8 * g)[:, :v]


# The encoder's row sums and exponentials have one fixed definition, so that the native encoder
# (engine/compact_kernel.c) reproduces the numpy one bit for bit on any machine: elementwise IEEE
# float64 arithmetic (+ - * /, rint, ldexp), sums in a stated order, and libm's log (math.log;
# numpy's own exp/log are SIMD code that differs between CPUs, BLAS sums differ between builds).
_F32_ZERO = np.float32(0.0)
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.90821492927058770002e-10
# Taylor coefficients 1/13!, ..., 1/2!, 1, 1: on |r| <= ln2/2 the truncation is ~4e-18 relative
_EXP_COEFS = tuple(1.0 / math.factorial(j) for j in range(13, -1, -1))


def _exp64(x: np.ndarray) -> np.ndarray:
    """e^x for float64 x <= 709, within ~2 ulp (x below -708 counts as -708, ~3e-308):
    x = n ln2 + r, |r| <= ln2/2, e^x = 2^n P(r), P Horner's form of the degree-13 Taylor series."""
    x = np.maximum(x, -708.0)
    n = np.rint(x * _LOG2E)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = np.full_like(r, _EXP_COEFS[0])
    for c in _EXP_COEFS[1:]:
        p *= r
        p += c
    return np.ldexp(p, n.astype(np.int32))


def _lane_sums(keys: np.ndarray, x: np.ndarray, n_keys: int) -> np.ndarray:
    """Per key 0..n_keys-1, the float64 sum of x over the entries with that key, in this fixed
    order: 4 lanes (keys = key * 4 + position % 4), each summed in position order (np.bincount
    is a plain loop), then (lane 0 + lane 1) + (lane 2 + lane 3)."""
    s = np.bincount(keys, weights=x, minlength=4 * n_keys)[: 4 * n_keys].reshape(n_keys, 4)
    return (s[:, 0] + s[:, 1]) + (s[:, 2] + s[:, 3])


def _log64(x: np.ndarray) -> np.ndarray:
    """libm's log of each entry (math.log; the native encoder calls the same function)."""
    return np.array([math.log(float(v)) for v in np.ravel(x)], np.float64).reshape(np.shape(x))


def _sum_levels(w: np.ndarray) -> np.ndarray:
    """Row sums of a [n, levels] float64 array, left to right."""
    acc = w[:, 0].copy()
    for j in range(1, w.shape[1]):
        acc += w[:, j]
    return acc


# Decoding looks up 4 codes (12 bits) at a time: row q of this table holds the level offsets of
# the 4 codes packed in q (NaN for code 7, whose value comes from the 8-bit tier).
_OFFSETS8 = np.array(COMPACT_LEVELS + (np.nan,), np.float64)
_QUAD_OFFSETS = _OFFSETS8[(np.arange(4096)[:, None] >> np.array([9, 6, 3, 0])) & 7]


class CompactEncoding(BaselineEncoding):
    """Tiered fixed-size codes at <= ``budget`` x llama.cpp's bytes per token (see module doc)."""

    name = "compact"

    def __init__(self, budget: float = 0.25, top: int | None = None):
        if not 0 < budget <= 1:
            raise ValueError(f"compact budget {budget} must be a fraction of llama.cpp's bytes in (0, 1]")
        self.budget = float(budget)
        self.top = None if top is None else int(top)

    def params(self):
        return {"budget": self.budget, "top": self.top}

    def layout(self, n_vocab: int) -> tuple[int, int]:
        """(T, K): explicitly stored top tokens, and tokens ranked <= K (8-bit codes)."""
        v = int(n_vocab)
        t = self.top if self.top is not None else int(min(32, max(4, v // 256)))
        total = int(math.floor(self.budget * LlamaCppUint16Encoding().bytes_per_token(v)))
        fixed = (3 * v + 7) // 8 + t * (np.dtype(_id_dtype(v)).itemsize + 2) + 4 * len(_HEADER) + 4
        k = total - fixed
        if k < max(t, 1) or k >= v:
            raise ValueError(f"the compact encoding does not fit n_vocab={v} in {total} bytes per token "
                             f"(budget {self.budget} of llama.cpp's); use another encoding for so small a vocabulary")
        return t, k

    def bytes_per_token(self, n_vocab, with_ref=True):
        t, k = self.layout(n_vocab)
        ids = np.dtype(_id_dtype(n_vocab)).itemsize
        return (3 * n_vocab + 7) // 8 + k + t * (ids + 2) + 4 * len(_HEADER) + (4 if with_ref else 0)

    def encode(self, logprobs, ref_tokens=None, *, threads: int = 1, native=None):
        """``native``: None for ``compact_encoder()`` (the compiled encoder when available, which
        gives the same arrays), False for numpy, or an encoder like kld_native's."""
        x = _check_logprobs(logprobs)
        n, v = x.shape
        t_top, k = self.layout(v)
        native = compact_encoder() if native is None else (native or None)
        ref = _check_ref(ref_tokens, n, v)
        out = {"codes": np.empty((n, (3 * v + 7) // 8), np.uint8),
               "mid": np.empty((n, k), np.uint8),
               "top_ids": np.empty((n, t_top), _id_dtype(v)),
               "top_codes": np.empty((n, t_top), np.uint16)}
        for name in _HEADER:
            out[name] = np.empty(n, np.float32)
        if ref is not None:
            out["ref_logprob"] = np.empty(n, np.float32)

        def work(blocks):
            for r0, r1 in blocks:
                self._encode_block(x, ref, out, r0, r1, t_top, k, native)

        run_row_blocks(n, rows_per_block(v), threads, work)
        return out

    def _encode_block(self, x, ref, out, r0, r1, t_top, k, native=None) -> None:
        """Rows r0:r1 of encode: rank, tier, fit the tilt, then measure the decoded rows."""
        v = x.shape[1]
        xb = np.ascontiguousarray(x[r0:r1], dtype=np.float32)
        rr = r1 - r0
        if native is not None:
            self._store_xent(out, r0, r1, xb, native(xb, ref, out, r0, r1, t_top, k))
            return
        codes = np.empty((rr, v), np.uint8)
        below = np.empty(v, bool)
        lanes = np.arange(v, dtype=np.intp) & 3
        refined_all = []
        for i in range(rr):
            row = xb[i]
            rel = row - row.max()  # <= 0, exact near the top (float32 is plenty for 8-bit codes)
            # The two values around rank K: one partition (no full sort); positions v-k.. hold
            # the k largest, position v-k-1 the rank K+1 value (+ 0: a -0.0 is stored as 0.0).
            part = np.partition(rel, (v - k - 1, v - k))
            anchor, floor = part[v - k - 1] + _F32_ZERO, part[v - k] + _F32_ZERO
            # Tokens ranked <= K, in vocabulary order (ties at the anchor: the first ones).
            ridx = np.flatnonzero(rel > anchor)
            if ridx.size < k:
                extra = np.flatnonzero(rel == anchor)[: k - ridx.size]
                ridx = np.sort(np.concatenate([ridx, extra]))
            mid_vals = rel[ridx].astype(np.float64)
            span = -float(floor) if floor < 0 else 1.0
            # Top T of them, by value (ties: vocabulary order).
            cut = np.partition(mid_vals, k - t_top)[k - t_top]
            cand = np.flatnonzero(mid_vals >= cut)
            pos = cand[np.lexsort((cand, -mid_vals[cand]))[:t_top]]
            out["top_ids"][r0 + i] = ridx[pos]
            top_codes = np.rint((mid_vals[pos] - floor) / span * 65535)
            out["top_codes"][r0 + i] = top_codes
            mid_codes = np.rint((mid_vals - floor) / span * 255)
            out["mid"][r0 + i] = mid_codes
            # Coarse levels: count how many level midpoints each token's distance exceeds.
            level = codes[i]
            level[:] = 0
            thresholds = [np.float32(float(anchor) - m) for m in _LEVEL_MIDS]
            counts = []
            for thr in thresholds:
                np.less(rel, thr, out=below)
                np.add(level, below.view(np.uint8), out=level)
                counts.append(int(np.count_nonzero(below)))
            level[ridx] = _REFINED
            refined_all.append(ridx)
            # Row sums in float64, in the fixed order of _lane_sums (what the native encoder
            # computes): the softmax normalizer, the coarse mass and sum p log p, and per level
            # the count and sum of the log-probs.
            rel64 = rel.astype(np.float64)
            e = _exp64(rel64)
            by_level = level.astype(np.intp) * 4 + lanes
            by_tier = (level == _REFINED).astype(np.intp) * 4 + lanes
            coarse_mass, refined_mass = _lane_sums(by_tier, e, 2)
            coarse_plp = _lane_sums(by_tier, e * rel64, 2)[0]
            sum_rel = _lane_sums(by_level, rel64, 8)[:_N_LEVELS]
            lse = math.log(coarse_mass + refined_mass)
            mx = -lse  # the row's largest normalized log-prob
            starts = np.array([0] + counts[::-1] + [v - k])  # level 6 first: the lowest values
            cnt = np.diff(starts).astype(np.float64)[::-1]
            out["row_max"][r0 + i] = mx
            out["mid_floor"][r0 + i] = floor
            out["anchor"][r0 + i] = anchor
            # Mass the refined tokens will have once decoded; the coarse part gets the rest.
            dec_ref = (np.float64(np.float32(floor)) + mid_codes * (span / 255)) + np.float64(np.float32(mx))
            dec_ref[pos] = (np.float64(np.float32(floor)) + top_codes * (span / 65535)) + np.float64(np.float32(mx))
            ref_mass = _lane_sums(lanes[:k], _exp64(dec_ref.astype(np.float32).astype(np.float64)), 1)[0]
            a, b = _fit_tilt_stats(cnt[None, :], (sum_rel - cnt * lse)[None, :],
                                   np.array([coarse_plp / max(coarse_mass, 1e-300) - lse]),
                                   (np.float64(np.float32(anchor)) - np.asarray(COMPACT_LEVELS))[None, :],
                                   np.array([mx]), np.array([max(1.0 - ref_mass, 1e-300)]))
            out["tilt_a"][r0 + i] = a[0]
            out["tilt_b"][r0 + i] = b[0]
            if ref is not None:
                out["ref_logprob"][r0 + i] = float(row[ref[r0 + i]] - row.max()) - lse
        out["codes"][r0:r1] = _pack3(codes)
        # The cross-entropy correction, -KL(p~ || p), by the same kernel that compares candidates
        # (so that the base compared with itself gives 0 up to float32 rounding of the result).
        dec = np.empty((rr, v), np.float32)
        self._decode_into(out, r0, r1, v, dec)
        self._store_xent(out, r0, r1, xb, dec)

    @staticmethod
    def _store_xent(out, r0, r1, xb, dec) -> None:
        m = compare_rows(lambda q0, q1, _buf: dec[q0:q1], xb, None,
                         base_top=np.asarray(out["top_ids"][r0:r1, 0]))
        out["xent_correction"][r0:r1] = -m.kld

    @staticmethod
    def _decode_into(enc, r0, r1, v, dec) -> np.ndarray:
        """float32 log-probs of rows r0:r1 into ``dec`` (not normalized: the KLD renormalizes).

        Per row, 4 codes at a time index a table of (anchor-relative, tilted) level values; the
        tokens ranked <= K (code 7, NaN in the table) then get their 8-bit values in vocabulary
        order, and the top T their 16-bit values."""
        word = _words24(enc["codes"][r0:r1], v)
        quads = np.empty((r1 - r0, word.shape[1], 2), np.uint32)
        np.right_shift(word, np.uint32(12), out=quads[:, :, 0])
        np.bitwise_and(word, np.uint32(0xFFF), out=quads[:, :, 1])
        v8 = word.shape[1] * 8
        for i in range(r1 - r0):
            q = r0 + i
            mx = float(enc["row_max"][q])
            floor = float(enc["mid_floor"][q])
            anchor = float(enc["anchor"][q])
            a, b = float(enc["tilt_a"][q]), float(enc["tilt_b"][q])
            span = -floor if floor < 0 else 1.0
            # coarse value: mx + a + b * (anchor - offset)
            table = ((mx + a + b * anchor) - b * _QUAD_OFFSETS).astype(np.float32)
            row = dec[i]
            if v8 == v:
                np.take(table, quads[i].reshape(-1), axis=0, out=row.reshape(-1, 4))
            else:
                row[:] = np.take(table, quads[i].reshape(-1), axis=0).reshape(v8)[:v]
            ridx = np.flatnonzero(np.isnan(row))
            mid = np.asarray(enc["mid"][q], np.float64)
            row[ridx] = floor + mid * (span / 255) + mx
            top = np.asarray(enc["top_codes"][q], np.float64)
            row[np.asarray(enc["top_ids"][q]).astype(np.int64)] = floor + top * (span / 65535) + mx
        return dec

    def decode_logprobs(self, encoded, n_vocab=None):
        if n_vocab is None:
            raise ValueError("compact.decode_logprobs needs n_vocab")
        v = int(n_vocab)
        n = self.n_rows(encoded)
        out = np.empty((n, v), np.float32)
        for r0, r1 in _blocks(n, v):
            self._decode_into(encoded, r0, r1, v, out[r0:r1])
        return out

    def kld_against(self, encoded, candidate_logits, ref_tokens=None, *, threads=1):
        n = self.n_rows(encoded)
        if candidate_logits.ndim != 2 or candidate_logits.shape[0] != n:
            raise ValueError(f"candidate logits {candidate_logits.shape} do not match {n} encoded rows")
        v = candidate_logits.shape[1]
        if encoded["codes"].shape[1] != (3 * v + 7) // 8:
            raise ValueError(f"the encoded rows were made for another vocabulary size than {v}")
        m = compare_rows(lambda r0, r1, buf: self._decode_into(encoded, r0, r1, v, buf),
                         candidate_logits, ref_tokens, base_top=np.asarray(encoded["top_ids"][:, 0]),
                         threads=threads)
        m.kld[:] = m.kld.astype(np.float64) + encoded["xent_correction"]
        if ref_tokens is not None and "ref_logprob" in encoded:
            _with_ref_extras(m, -np.asarray(encoded["ref_logprob"], np.float64))
        return m


def float16_encoder():
    """The compiled float16 encoder ``Float16Encoding`` uses by default, or None for numpy.

    It lives in ``ggufopt_ray.engine.f16_native`` (built on first use like the KLD kernel, and
    selected by the same ``GGUFOPT_KLD_KERNEL=auto|native|numpy``); its codes are float16 of the
    compiled ``kld.log_softmax``, as this module's are of the numpy one. This module stays
    numpy-only: the import is lazy."""
    from ggufopt_ray.engine import f16_native

    return f16_native.float16_encoder()


def compact_encoder():
    """The compiled compact encoder ``CompactEncoding.encode`` uses by default, or None for numpy.

    It lives in ``ggufopt_ray.engine.kld_native`` (built on first use like the KLD kernel, and
    selected by the same ``GGUFOPT_KLD_KERNEL=auto|native|numpy``); it produces the same arrays as
    the numpy code. This module stays numpy-only: the import is lazy."""
    from ggufopt_ray.engine import kld_native

    return kld_native.compact_encoder()


def _fit_tilt_stats(cnt, sum_lp, target, level_rel, mx, mass, iters: int = 40):
    """Per row (a, b): coarse log p~ = mx + a + b * level_rel[level], with the coarse tokens' exact
    mass (``mass``) and exact mean log-prob (``target``, under p, over the coarse tokens).

    ``cnt``/``sum_lp``: per row and level, the number of coarse tokens and the sum of their
    log-probs. The mean of log p under weights ``cnt_j * exp(b * level_rel_j)`` increases with b,
    so b is found by bisection on [0.05, 20]. Rows with fewer than two occupied levels keep b = 1.
    """
    mean_per_level = sum_lp / np.where(cnt > 0, cnt, 1.0)
    occupied = cnt > 0

    def log_weights(b):
        z = np.where(occupied, b[:, None] * level_rel, -np.inf)
        zmax = np.where(occupied.any(axis=1), z.max(axis=1), 0.0)
        return z, zmax

    def tilted_mean(b):
        z, zmax = log_weights(b)
        w = cnt * _exp64(z - zmax[:, None])
        ws = _sum_levels(w)
        return _sum_levels(w * mean_per_level) / np.where(ws > 0, ws, 1.0)

    n = cnt.shape[0]
    fit = occupied.sum(axis=1) >= 2
    lo, hi = np.full(n, 0.05), np.full(n, 20.0)
    b = np.ones(n)
    for _ in range(iters):
        b = np.where(fit, 0.5 * (lo + hi), 1.0)
        up = tilted_mean(b) < target
        lo = np.where(up, b, lo)
        hi = np.where(up, hi, b)
    z, zmax = log_weights(b)
    s = _sum_levels(cnt * _exp64(z - zmax[:, None]))
    a = np.where(s > 0, _log64(mass) - mx - zmax - _log64(np.where(s > 0, s, 1.0)), 0.0)
    return a, b


ENCODINGS: dict[str, type[BaselineEncoding]] = {
    cls.name: cls for cls in (ExactEncoding, Float16Encoding, LlamaCppUint16Encoding, TopKEncoding, CompactEncoding)
}


def get_encoding(name: str, **params) -> BaselineEncoding:
    """The encoding registered as ``name`` (exact, float16, llamacpp_uint16, topk, compact)."""
    from ggufopt_ray.errors import UserError

    cls = ENCODINGS.get(name)
    if cls is None:
        raise UserError(f"unknown baseline encoding {name!r}; choose from {', '.join(ENCODINGS)}")
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return cls(**params)
    except TypeError as e:
        raise UserError(f"bad parameters {params} for encoding {name!r}: {e}") from None
