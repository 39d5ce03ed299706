"""Per-token comparison of a candidate's next-token distributions with the baseline's.

Every number the project reports starts here: for each scored position, KL(base || candidate)
over the full vocabulary, whether both models agree on the top token, the change Δp of the
probability of the reference (next) token, and its negative log-likelihood under both models.

How the KL divergence is computed, and why it is both fast and accurate
----------------------------------------------------------------------
With base log-probabilities ``a`` (normalized or not: they are renormalized in float64) and
candidate logits ``b``, write ``p = softmax(a)`` and ``d = b - a`` (each side first shifted by an
integer, which is exact in float32 near the top of the distribution). Then, for any shift ``c``::

    KL(p || softmax(b)) = log sum_i p_i exp(d_i - c) - sum_i p_i (d_i - c)

With ``c`` the p-weighted mean of ``d`` and ``s = d - c``, ``exp(s) = 1 + s + t`` where
``t = expm1(s) - s >= 0``, and ``sum p s = 0``, so with ``z = sum p t``::

    KL = log1p(z)

This form never subtracts two large numbers: ``z`` is a sum of non-negative terms. The
element-wise work is float32 (two SIMD transcendentals per vocabulary entry: ``exp`` for p,
``expm1`` for t); every sum that matters is finished in float64 (BLAS sums of 256-entry
segments, added in float64), and the term of the base's top token is redone in float64. Against
a float64 reference on the same float32 inputs the result agrees to a few 1e-7 relative for KL
>= 1e-2, to about 1e-6 (at most ~2e-6 seen, on broad distributions whose logits straddle zero)
at KL ~ 1e-3, and to about 1e-5 at KL = 1e-6, where a plain ``sum p (log p - log q)`` in float32
has no correct digit. What remains is the float32 rounding of the logit differences ``d``;
taking them in float64 would cost ~30% of the speed. A distribution compared with itself
gives exactly 0 (``d`` is exactly 0). Rows whose values are not finite, or where the candidate
puts e^88 times the base's mass on a token (``expm1`` overflows in float32), are recomputed in
plain float64.

Rows are processed in blocks of about 512 KiB so the temporaries stay in the CPU's cache and
memory stays bounded whatever the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# Elements per row block: a few float32 temporaries of this size stay in a 1-2 MiB L2 cache.
BLOCK_ELEMENTS = 1 << 17


@dataclass
class TokenMetrics:
    """Per-token comparison values, one entry per scored position, all float32.

    kld: KL(base || candidate) in nats. same_top: 1.0 where both argmaxes agree, else 0.0.
    delta_p: p_candidate(ref) - p_base(ref). nll_base / nll_cand: -log p(ref) under each
    model. The last three are NaN where no reference tokens were given.
    """

    kld: np.ndarray
    same_top: np.ndarray
    delta_p: np.ndarray
    nll_base: np.ndarray
    nll_cand: np.ndarray

    def __post_init__(self):
        n = None
        for f in fields(self):
            v = np.ascontiguousarray(getattr(self, f.name), dtype=np.float32).reshape(-1)
            if n is not None and v.shape[0] != n:
                raise ValueError(f"TokenMetrics.{f.name} has {v.shape[0]} entries, expected {n}")
            n = v.shape[0]
            setattr(self, f.name, v)

    def __len__(self) -> int:
        return int(self.kld.shape[0])

    def __getitem__(self, index) -> "TokenMetrics":
        return TokenMetrics(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def empty(cls, n: int = 0) -> "TokenMetrics":
        return cls(**{f.name: np.zeros(n, np.float32) for f in fields(cls)})

    @classmethod
    def concat(cls, parts) -> "TokenMetrics":
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The per-token arrays by name (what a results store keeps per chunk)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> "TokenMetrics":
        """Inverse of ``to_arrays``; also accepts a TokenMetrics (returned as is)."""
        if isinstance(arrays, cls):
            return arrays
        return cls(**{f.name: np.asarray(arrays[f.name]) for f in fields(cls)})


def log_softmax(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax of ``[n, V]`` logits as float32; the normalizer is summed in float64.

    Computed as ``(x - max) - log(sum exp(x - max))`` so that the largest log-probs, which carry
    the mass, are rounded only once. ``out`` may be ``logits`` itself when that is float32.
    """
    x = logits
    if x.ndim != 2:
        raise ValueError(f"log_softmax expects [n_tokens, n_vocab] logits, got shape {x.shape}")
    if out is None:
        out = np.empty(x.shape, np.float32)
    n, v = x.shape
    step = max(1, BLOCK_ELEMENTS // max(v, 1))
    tmp = np.empty((min(step, n), v), np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blk = np.asarray(x[r0:r1], dtype=np.float32)
        m = blk.max(axis=1, keepdims=True)
        shifted = np.subtract(blk, m, out=out[r0:r1])
        e = np.exp(shifted, out=tmp[: r1 - r0])
        log_sum = np.log(_rowsum(e)).astype(np.float32)
        np.subtract(shifted, log_sum[:, None], out=shifted)
    return out


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum(x * y, axis=1) of two C-contiguous float32 [R, V] blocks, as float64 (rough: float32
    BLAS accumulation, ~1e-7..1e-6 relative)."""
    return np.matmul(x[:, None, :], y[:, :, None])[:, 0, 0].astype(np.float64)


_SEGMENT = 256


def _rowsum(x: np.ndarray) -> np.ndarray:
    """Accurate float64 row sums of a C-contiguous float32 [R, V] block.

    Segments of 256 entries are summed by BLAS in float32 (error ~1e-8 relative each) and the
    segment sums are added in float64: ~1e-8 relative overall, at a third of the cost of a
    float64 conversion.
    """
    r, v = x.shape
    k = v // _SEGMENT * _SEGMENT
    total = np.zeros(r, np.float64)
    if k:
        seg = x[:, :k].reshape(r * (k // _SEGMENT), _SEGMENT) @ _ONES[: _SEGMENT]
        total += seg.reshape(r, k // _SEGMENT).sum(axis=1, dtype=np.float64)
    if k < v:
        total += x[:, k:].sum(axis=1, dtype=np.float64)
    return total


_ONES = np.ones(_SEGMENT, np.float32)


def _rows_float64(a: np.ndarray, b: np.ndarray):
    """Plain float64 KL and log-normalizers for a few rows; handles -inf and overflow.

    Returns (kld, lse_a, lse_b) with entries of zero base probability contributing 0.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ma = a.max(axis=1, keepdims=True)
        mb = b.max(axis=1, keepdims=True)
        lse_a = ma[:, 0] + np.log(np.exp(a - ma).sum(axis=1))
        lse_b = mb[:, 0] + np.log(np.exp(b - mb).sum(axis=1))
        la = a - lse_a[:, None]
        lb = b - lse_b[:, None]
        p = np.exp(la)
        terms = np.where(p > 0, p * (la - lb), 0.0)
        terms = np.where(np.isnan(la) | np.isnan(lb), np.nan, terms)
        kld = terms.sum(axis=1)
    return kld, lse_a, lse_b


def kld_per_token(base_logprobs: np.ndarray, candidate_logits: np.ndarray,
                  ref_tokens: np.ndarray | None = None, *,
                  block_elements: int = BLOCK_ELEMENTS) -> TokenMetrics:
    """Per-token KL(base || candidate) and companions, over the full vocabulary.

    base_logprobs: ``[n, V]`` baseline log-probabilities (any float dtype; renormalized in
    float64, so unnormalized logits work too). candidate_logits: ``[n, V]`` raw logits of the
    candidate. ref_tokens: ``[n]`` the token that follows each scored position (the one whose
    NLL and Δp are reported); without it those fields are NaN. Arrays may be memory-mapped or
    HDF5-backed: they are read in row blocks.
    """
    a_all, b_all = base_logprobs, candidate_logits
    if a_all.ndim != 2 or b_all.shape != a_all.shape:
        raise ValueError(f"base log-probs {getattr(a_all, 'shape', None)} and candidate logits "
                         f"{getattr(b_all, 'shape', None)} must both be [n_tokens, n_vocab]")
    n, v = a_all.shape
    if ref_tokens is not None:
        ref = np.asarray(ref_tokens).astype(np.int64, copy=False).reshape(-1)
        if ref.shape[0] != n:
            raise ValueError(f"{ref.shape[0]} reference tokens for {n} rows")
        if n and (ref.min() < 0 or ref.max() >= v):
            raise ValueError(f"reference token ids must lie in [0, {v})")
    else:
        ref = None
    out = {k: np.empty(n, np.float32) for k in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}
    if n == 0:
        return TokenMetrics(**out)

    step = max(1, int(block_elements) // v)
    rmax = min(step, n)
    buf_e = np.empty((rmax, v), np.float32)
    buf_d = np.empty((rmax, v), np.float32)
    buf_t = np.empty((rmax, v), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # such rows are redone in float64
        for r0 in range(0, n, step):
            _block(a_all, b_all, ref, out, r0, min(n, r0 + step), buf_e, buf_d, buf_t)
    if ref is None:
        for k in ("delta_p", "nll_base", "nll_cand"):
            out[k][:] = np.nan
    return TokenMetrics(**out)


def _block(a_all, b_all, ref, out, r0, r1, buf_e, buf_d, buf_t) -> None:
    """kld_per_token for rows r0:r1, written into ``out``."""
    rr = r1 - r0
    a = np.ascontiguousarray(a_all[r0:r1], dtype=np.float32)
    b = np.ascontiguousarray(b_all[r0:r1], dtype=np.float32)
    rows = np.arange(rr)
    ia = a.argmax(axis=1)
    ib = b.argmax(axis=1)
    # Shift each side by the integer ceil(its value at the base's top token): exact in float32
    # for every value within a factor 2 of the shift, so the mass-carrying top of p is not
    # perturbed (a - max a would move p by ~5e-7 relative); d is small near the top, where it
    # matters; and a distribution compared with itself gives d = 0 exactly.
    ka = np.ceil(a[rows, ia])
    kb = np.ceil(b[rows, ia])
    if np.any(ka):
        sha = np.subtract(a, ka[:, None], out=buf_d[:rr])
    else:  # log-probs of a confident row (max in (-1, 0]): no shift, saves a pass
        sha = a
    ea = np.exp(sha, out=buf_e[:rr])
    sa = _rowsum(ea)  # >= exp(-1): the max contributes exp(a_max - ceil(a_max))
    d = np.subtract(b, kb[:, None], out=buf_t[:rr])
    d = np.subtract(d, sha, out=buf_d[:rr])  # d = (b - kb) - (a - ka)
    # Centre d on its p-weighted mean c, so that y = sum p s is ~0: any c is exact in
    # log1p(y + z) - y; this one keeps s small (expm1 accurate) and lets y be dropped, which
    # costs only an error of order y * z + y^2 / 2.
    c32 = (_rowdot(ea, d) / sa).astype(np.float32)
    s = np.subtract(d, c32[:, None], out=d)
    s_top = s[rows, ia].astype(np.float64)
    t = np.expm1(s, out=buf_t[:rr])  # overflow (s > 88) shows up as a non-finite z below
    np.subtract(t, s, out=t)
    # The base's top token carries the largest share of t's float32 rounding; its term is
    # redone in float64 (matters for peaked distributions).
    top_fix = ((np.expm1(s_top) - s_top) - t[rows, ia]) * ea[rows, ia]
    z = (_rowsum(np.multiply(ea, t, out=t)) + top_fix) / sa
    kld = np.log1p(z)  # = log sum p exp(s) - sum p s, with sum p s = 0
    lse_a = ka.astype(np.float64) + np.log(sa)
    # lse_b - lse_a = log sum p exp(b - a) = (kb - ka) + c + log1p(z)
    lse_b = kb.astype(np.float64) + c32.astype(np.float64) + np.log(sa) + kld
    bad = ~np.isfinite(kld) | ~np.isfinite(lse_b)
    if bad.any():
        k64, la64, lb64 = _rows_float64(a[bad], b[bad])
        kld[bad], lse_a[bad], lse_b[bad] = k64, la64, lb64
    out["kld"][r0:r1] = kld
    out["same_top"][r0:r1] = ib == ia
    if ref is not None:
        tok = ref[r0:r1]
        nll_b = lse_a - a[rows, tok].astype(np.float64)
        nll_c = lse_b - b[rows, tok].astype(np.float64)
        out["nll_base"][r0:r1] = nll_b
        out["nll_cand"][r0:r1] = nll_c
        out["delta_p"][r0:r1] = np.exp(-nll_c) - np.exp(-nll_b)
