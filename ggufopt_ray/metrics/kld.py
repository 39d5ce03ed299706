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

This is the numpy kernel. ``compare_rows`` (and so every caller) uses the compiled one of
``ggufopt_ray.engine.kld_native`` instead when it can be built (same outputs, same float64
fallback, one pass per row; ``GGUFOPT_KLD_KERNEL=auto|native|numpy`` selects, see ``row_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from ggufopt_ray.metrics.row_blocks import check_threads, run_row_blocks

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
    if _compiled_log_softmax(x, out):
        return out
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


def _compiled_log_softmax(x: np.ndarray, out: np.ndarray) -> bool:
    """``log_softmax`` by the compiled kernel (``ggufopt_ray.engine.f16_native``: the same formula,
    its own exponential and float64 sum) when selected and available and the arrays are float32
    rows; False otherwise. This module stays numpy-only: the import is lazy."""
    from ggufopt_ray.engine import f16_native

    return f16_native.log_softmax(x, out)


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


def rows_per_block(n_vocab: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows processed together: ``block_elements // n_vocab``, at least one."""
    return max(1, int(block_elements) // max(int(n_vocab), 1))


# A base row is read into float32 rows r0:r1 by a loader ``load(r0, r1, out) -> [r1-r0, V]``:
# it may return a view of its own storage (float32 arrays) or fill ``out`` (a scratch block of
# the worker that asked), so that encodings decode straight into the kernel's buffers.
BaseLoader = Callable[[int, int, np.ndarray], np.ndarray]


def array_loader(x) -> BaseLoader:
    """Loader for an ``[n, V]`` array-like of any float dtype (ndarray, memmap, HDF5 dataset).

    Its ``rows`` attribute is ``x`` itself, so that a compiled kernel can read float16 or float32
    rows in place instead of through the loader."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous:
        def load(r0, r1, out):
            return x[r0:r1]
    elif isinstance(x, np.ndarray) and x.dtype == np.float16:
        def load(r0, r1, out):
            return float16_to_float32(x[r0:r1], out)
    else:
        def load(r0, r1, out):
            np.copyto(out, np.asarray(x[r0:r1]), casting="unsafe")
            return out

    load.rows = x
    return load


_F16_TO_F32_SCALE = np.float32(2.0 ** 112)  # 2^(127 - 15): float32 exponent bias minus float16's


def float16_to_float32(h: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 -> float32 with integer shifts, about 3x faster than numpy's cast on x86-64 without
    AVX-512 (numpy converts float16 one element at a time there); exact for every finite value.

    The float16 bits, sign-extended to 32 and shifted left by 13, put the exponent and mantissa
    where float32 keeps them; a multiplication by 2^112 then corrects the exponent bias (and turns
    float16 subnormals into normal float32 numbers). Blocks holding an inf or NaN code (exponent
    31, which the multiplication would not map to inf) use numpy's cast.
    """
    h = np.ascontiguousarray(h)
    bits = h.view(np.int16)
    if np.max(np.left_shift(bits.view(np.uint16), 1)) >= 0xF800:  # some |x| is inf or NaN
        np.copyto(out, h, casting="unsafe")
        return out
    w = out.view(np.int32)
    np.copyto(w, bits, casting="unsafe")
    np.left_shift(w, 13, out=w)
    np.bitwise_and(w, np.int32(-0x70002000), out=w)  # 0x8FFFE000: sign, then exponent and mantissa
    np.multiply(out, _F16_TO_F32_SCALE, out=out)
    return out


def kld_per_token(base_logprobs: np.ndarray, candidate_logits: np.ndarray,
                  ref_tokens: np.ndarray | None = None, *,
                  block_elements: int = BLOCK_ELEMENTS, threads: int = 1, kernel=None) -> TokenMetrics:
    """Per-token KL(base || candidate) and companions, over the full vocabulary.

    base_logprobs: ``[n, V]`` baseline log-probabilities (any float dtype; renormalized in
    float64, so unnormalized logits work too). candidate_logits: ``[n, V]`` raw logits of the
    candidate. ref_tokens: ``[n]`` the token that follows each scored position (the one whose
    NLL and Δp are reported); without it those fields are NaN. Arrays may be memory-mapped or
    HDF5-backed: they are read in row blocks. ``threads``: row blocks are shared among this many
    threads (numpy releases the GIL); the results do not depend on it.
    """
    a_all, b_all = base_logprobs, candidate_logits
    if a_all.ndim != 2 or b_all.shape != a_all.shape:
        raise ValueError(f"base log-probs {getattr(a_all, 'shape', None)} and candidate logits "
                         f"{getattr(b_all, 'shape', None)} must both be [n_tokens, n_vocab]")
    return compare_rows(array_loader(a_all), b_all, ref_tokens, block_elements=block_elements,
                        threads=threads, kernel=kernel)


def compare_rows(load_base: BaseLoader, candidate_logits, ref_tokens=None, *,
                 base_top: np.ndarray | None = None, threads: int = 1,
                 block_elements: int = BLOCK_ELEMENTS, kernel=None) -> TokenMetrics:
    """kld_per_token with the base rows given by a loader (see ``array_loader``).

    ``base_top``: the base's top token per row when the caller knows it (saves a pass; also
    decides ``same_top``). Row blocks go to ``threads`` workers, each with its own scratch
    buffers (a few float32 blocks of ``block_elements``), so memory stays bounded by the block
    size and the thread count, never by the chunk. ``kernel``: None for ``row_kernel()`` (the
    compiled kernel when available), ``"numpy"`` for this module's, or a callable like it.
    """
    b_all = candidate_logits
    if b_all.ndim != 2:
        raise ValueError(f"candidate logits must be [n_tokens, n_vocab], got shape {b_all.shape}")
    n, v = b_all.shape
    threads = check_threads(threads)
    if ref_tokens is not None:
        ref = np.asarray(ref_tokens).astype(np.int64, copy=False).reshape(-1)
        if ref.shape[0] != n:
            raise ValueError(f"{ref.shape[0]} reference tokens for {n} rows")
        if n and (ref.min() < 0 or ref.max() >= v):
            raise ValueError(f"reference token ids must lie in [0, {v})")
    else:
        ref = None
    if base_top is not None:
        base_top = np.asarray(base_top).astype(np.int64, copy=False).reshape(-1)
    out = {k: np.empty(n, np.float32) for k in ("kld", "same_top", "delta_p", "nll_base", "nll_cand")}
    if n == 0:
        return TokenMetrics(**out)

    kernel = row_kernel() if kernel is None else (None if kernel == "numpy" else kernel)
    if kernel is not None:
        kernel(load_base, b_all, ref, base_top, out, threads=threads, block_elements=block_elements)
    else:
        need_cand = not _is_f32_rows(b_all)

        def work(blocks) -> None:
            scratch = _Scratch(min(rows_per_block(v, block_elements), n), v, need_cand)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # such rows are redone in float64
                for r0, r1 in blocks:
                    _block(load_base, b_all, ref, base_top, out, r0, r1, scratch)

        run_row_blocks(n, rows_per_block(v, block_elements), threads, work)
    if ref is None:
        for k in ("delta_p", "nll_base", "nll_cand"):
            out[k][:] = np.nan
    return TokenMetrics(**out)


def row_kernel():
    """The compiled kernel that ``compare_rows`` uses by default, or None for the numpy one.

    It lives in ``ggufopt_ray.engine.kld_native`` (built with the system C compiler on first use;
    ``GGUFOPT_KLD_KERNEL=auto|native|numpy`` selects), called as
    ``kernel(load_base, candidate_logits, ref, base_top, out, threads=, block_elements=)`` to fill
    ``out`` as this module's ``_block`` does. This module stays numpy-only: the import is lazy.
    """
    from ggufopt_ray.engine import kld_native

    return kld_native.default_kernel()


def _is_f32_rows(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous


class _Scratch:
    """One worker's buffers: four float32 blocks for the kernel, one block for base rows
    that a loader decodes, and one for candidate rows that must be converted (not float32, or not
    contiguous)."""

    def __init__(self, rows: int, v: int, need_cand: bool):
        self.work = [np.empty((rows, v), np.float32) for _ in range(4)]
        self.base = np.empty((rows, v), np.float32)
        self.cand = np.empty((rows, v), np.float32) if need_cand else None
        self.rows = np.arange(rows)


# Tokens holding more than this share of the base's mass get their term redone in float64 (at
# most 64 per row): their float32 rounding would otherwise dominate the error of peaked rows.
_FIX_SHARE = 1.0 / 64


def _heavy_entries(x: np.ndarray, threshold: np.ndarray):
    """(rows, columns) of the entries of a float32 [R, V] block above a per-row threshold, when
    they are few. Columns are grouped with a stride (group g = columns g, g + V/256, ...), whose
    maxima one vertical SIMD pass gives; only the groups holding such an entry are searched
    (np.nonzero over the whole block costs ~10x more)."""
    r, v = x.shape
    m = v // _SEGMENT  # columns per stride group row
    k = m * _SEGMENT
    rows, cols = [], []
    if k:
        grid = x[:, :k].reshape(r, _SEGMENT, m)
        gr, gc = np.nonzero(grid.max(axis=1) > threshold[:, None])
        if gr.size:
            er, ej = np.nonzero(grid[gr, :, gc] > threshold[gr, None])
            rows.append(gr[er])
            cols.append(ej * m + gc[er])
    if k < v:
        tr, tc = np.nonzero(x[:, k:] > threshold[:, None])
        rows.append(tr)
        cols.append(tc + k)
    if not rows:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.concatenate(rows), np.concatenate(cols)


def _block(load_base, b_all, ref, base_top, out, r0, r1, sc: _Scratch) -> None:
    """kld_per_token for rows r0:r1, written into ``out``."""
    rr = r1 - r0
    w1, w2, w3, w4 = (w[:rr] for w in sc.work)
    a = load_base(r0, r1, sc.base[:rr])
    if sc.cand is None:
        b = b_all[r0:r1]
    else:
        b = sc.cand[:rr]
        np.copyto(b, np.asarray(b_all[r0:r1]), casting="unsafe")
    rows = sc.rows[:rr]
    ia = a.argmax(axis=1) if base_top is None else base_top[r0:r1]
    ib = b.argmax(axis=1)
    # Shift each side by the integer ceil(its value at the base's top token): exact in float32
    # for every value within a factor 2 of the shift, so the mass-carrying top of p is not
    # perturbed (a - max a would move p by ~5e-7 relative); d is small near the top, where it
    # matters; and a distribution compared with itself gives d = 0 exactly.
    ka = np.ceil(a[rows, ia])
    kb = np.ceil(b[rows, ia])
    if np.any(ka):
        sha = np.subtract(a, ka[:, None], out=w4)
    else:  # log-probs of a confident row (max in (-1, 0]): no shift, saves a pass
        sha = a
    ea = np.exp(sha, out=w1)
    sa = _rowsum(ea)  # >= exp(-1): the max contributes exp(a_max - ceil(a_max))
    d = np.subtract(b, kb[:, None], out=w2)
    d = np.subtract(d, sha, out=d)  # d = (b - kb) - (a - ka)
    # Centre d on its p-weighted mean c, so that y = sum p s is ~0: any c is exact in
    # log1p(y + z) - y; this one keeps s small and lets y be dropped, which costs only an error
    # of order y * z + y^2 / 2.
    c32 = (_rowdot(ea, d) / sa).astype(np.float32)
    s = np.subtract(d, c32[:, None], out=d)
    # t = e^s - 1 - s >= 0, as u - 1 - log(u) with u = float32 e^s: exact for the rounded u, and
    # the rounding error e of u only enters as (u - 1) e ~ s e, so both SIMD transcendentals
    # (numpy has no SIMD expm1 without AVX-512) keep t accurate relative to its size.
    u = np.exp(s, out=w3)  # overflow or underflow shows up as a non-finite z below
    lg = np.log(u, out=w4)
    t = np.subtract(u, np.float32(1), out=u)
    t = np.subtract(t, lg, out=t)
    # The heaviest tokens carry the largest share of t's float32 rounding; their terms are
    # redone in float64 (matters for peaked distributions).
    hr, hc = _heavy_entries(ea, (sa * _FIX_SHARE).astype(np.float32))
    s_h = s[hr, hc].astype(np.float64)
    fix = np.bincount(hr, weights=((np.expm1(s_h) - s_h) - t[hr, hc]) * ea[hr, hc], minlength=rr)
    z = (_rowsum(np.multiply(ea, t, out=w4)) + fix) / sa
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
