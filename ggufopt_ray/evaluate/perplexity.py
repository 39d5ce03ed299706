"""Perplexity of a model on evaluation chunks, with standard errors, scored like llama-perplexity.

Each chunk is a token array that already starts with BOS (``LogitsEngine.prepare_chunk``). As in
llama-perplexity only the second half of a chunk is scored by default: with ``first = len/2``
the logits at positions ``first .. len-2`` predict tokens ``first+1 .. len-1``, so every scored
token has at least half a context of history. ``first=0`` scores every prediction.

Numbers: per-token negative log-likelihoods come from a max-shifted log-sum-exp in float64 over
the full vocabulary. ``ln(PPL)`` is their mean; its standard error is the sample standard
deviation over ``sqrt(N)`` (what llama-perplexity prints, which treats tokens as independent),
and ``PPL ± SE`` follows by the delta method (``SE(PPL) = PPL * SE(ln PPL)``). Because tokens of
one chunk are correlated, the between-chunk standard error (chunks as clusters, a ratio
estimator) is reported too; it is the more honest figure when there are enough chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ggufopt_ray.errors import UserError


# -- per-token numbers ------------------------------------------------------------------------
def scoring_start(n_tokens: int, first: int | None = None) -> int:
    """Index of the first logit row scored in a chunk of ``n_tokens`` (default ``n_tokens // 2``)."""
    if n_tokens < 2:
        raise UserError(f"a chunk of {n_tokens} token(s) has nothing to predict; use chunks of at "
                        "least 2 tokens")
    start = n_tokens // 2 if first is None else int(first)
    if not 0 <= start <= n_tokens - 2:
        raise UserError(f"first scored position {start} is outside 0..{n_tokens - 2} for a chunk of "
                        f"{n_tokens} tokens; lower --first")
    return start


def token_nll(logits: np.ndarray, tokens: Sequence[int], first: int | None = None,
              block_values: int = 1 << 24) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of ``tokens[j+1]`` under the logit row of
    position ``j``, for ``j = first .. len(tokens)-2``; rows are processed in blocks of about
    ``block_values``.

    ``logits`` holds either every position (``len(tokens)`` rows) or only positions ``first ..
    len(tokens)-1`` (what ``engine.logits(tokens, first=first)`` returns)."""
    logits = np.asarray(logits)
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size
    start = scoring_start(n, first)
    if logits.ndim != 2 or logits.shape[0] not in (n, n - start):
        raise ValueError(f"logits shape {logits.shape} does not match {n} tokens (scoring from {start})")
    offset = 0 if logits.shape[0] == n else start  # row of position j is logits[j - offset]
    rows = max(1, block_values // max(1, logits.shape[1]))
    out = np.empty(n - 1 - start, dtype=np.float64)
    for s in range(start, n - 1, rows):
        e = min(s + rows, n - 1)
        z = logits[s - offset:e - offset].astype(np.float64)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        out[s - start:e - start] = lse - z[np.arange(e - s), tokens[s + 1:e + 1]]
    return out


# -- statistics -------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    """Perplexity with standard errors; ``nll`` keeps every scored token's NLL in chunk order."""

    ppl: float
    ppl_se: float
    ln_ppl: float
    ln_ppl_se: float  # per-token SE, as llama-perplexity prints
    ln_ppl_se_chunks: float  # between-chunk (cluster) SE; nan with fewer than 2 chunks
    n_tokens: int
    n_chunks: int
    chunk_ln_ppl: list[float] = field(default_factory=list)
    chunk_n_tokens: list[int] = field(default_factory=list)
    first: int | None = None  # scoring start requested (None: half of each chunk)
    model: str | None = None
    nll: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def chunk_ppl(self) -> list[float]:
        return [math.exp(x) for x in self.chunk_ln_ppl]

    def to_dict(self, include_nll: bool = False) -> dict:
        d = {k: getattr(self, k) for k in ("model", "ppl", "ppl_se", "ln_ppl", "ln_ppl_se",
                                           "ln_ppl_se_chunks", "n_tokens", "n_chunks", "first",
                                           "chunk_ln_ppl", "chunk_n_tokens")}
        d["chunk_ppl"] = self.chunk_ppl
        for k in ("ppl", "ppl_se", "ln_ppl", "ln_ppl_se", "ln_ppl_se_chunks"):
            d[k] = d[k] if math.isfinite(d[k]) else None
        if include_nll:
            d["nll"] = self.nll.tolist()
        return d


def perplexity_from_nll(chunk_nll: Sequence[np.ndarray], first: int | None = None,
                        model: str | None = None) -> PerplexityResult:
    """Perplexity and its standard errors from the per-token NLLs of each chunk."""
    chunk_nll = [np.asarray(c, dtype=np.float64).reshape(-1) for c in chunk_nll]
    nll = np.concatenate(chunk_nll) if chunk_nll else np.zeros(0)
    n = nll.size
    if n == 0:
        raise UserError("no token was scored; give longer chunks or more of them")
    ln_ppl = float(nll.mean())
    ln_se = float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    sizes = np.array([c.size for c in chunk_nll], dtype=np.float64)
    means = np.array([c.mean() if c.size else math.nan for c in chunk_nll])
    k = int((sizes > 0).sum())
    if k > 1:
        w, mu = sizes[sizes > 0], means[sizes > 0]
        # ratio estimator over clusters: Var = k/(k-1) * sum(w^2 (mu - mean)^2) / (sum w)^2
        se_chunks = float(math.sqrt(k / (k - 1) * np.sum((w * (mu - ln_ppl)) ** 2)) / w.sum())
    else:
        se_chunks = math.nan
    ppl = math.exp(ln_ppl) if ln_ppl < 700 else math.inf
    return PerplexityResult(
        ppl=ppl, ppl_se=ppl * ln_se, ln_ppl=ln_ppl, ln_ppl_se=ln_se, ln_ppl_se_chunks=se_chunks,
        n_tokens=n, n_chunks=len(chunk_nll), chunk_ln_ppl=[float(x) for x in means],
        chunk_n_tokens=[int(s) for s in sizes], first=first, model=model, nll=nll)


def ln_ppl_ratio(result: PerplexityResult, reference: PerplexityResult) -> tuple[float, float]:
    """``ln(PPL/PPL_ref)`` and its standard error from paired per-token NLL differences.

    Both results must score the same tokens (same chunks and ``first``); the pairing removes
    the shared difficulty of the text, so this SE is much smaller than either ln(PPL)'s.
    """
    if result.nll.shape != reference.nll.shape:
        raise UserError(f"cannot compare perplexities over different tokens ({result.n_tokens} vs "
                        f"{reference.n_tokens} scored); use the same chunks for both models")
    d = result.nll - reference.nll
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


# -- running a model --------------------------------------------------------------------------
def evaluate_perplexity(engine, chunks: Sequence[np.ndarray], first: int | None = None, *,
                        progress: bool = False, model: str | None = None) -> PerplexityResult:
    """Perplexity of the model loaded in ``engine`` (a ``LogitsEngine``) on ``chunks``.

    The chunks are used as given: prepare them with ``engine.prepare_chunk`` (BOS first). Only
    the scored positions are computed; chunks of one length go ``engine.n_seq`` at a time
    through ``logits_many`` (several sequences per decode, as llama-perplexity does).
    """
    from tqdm import tqdm

    if len(chunks) == 0:
        raise UserError("no evaluation chunks given; give at least one chunk of tokens")
    chunks = [np.ascontiguousarray(c, dtype=np.int32) for c in chunks]
    starts = [scoring_start(tokens.size, first) for tokens in chunks]  # fail before the model runs
    group = max(1, int(getattr(engine, "n_seq", 1)))
    per_chunk: list[np.ndarray] = []
    with tqdm(total=len(chunks), desc="perplexity", unit="chunk", disable=not progress) as bar:
        for i in range(0, len(chunks), group):
            part, part_starts = chunks[i:i + group], starts[i:i + group]
            if len(part) > 1 and len(set(part_starts)) == 1:
                rows = engine.logits_many(part, first=part_starts[0])
            else:
                rows = [engine.logits(c, first=s) for c, s in zip(part, part_starts)]
            per_chunk.extend(token_nll(r, c, s) for r, c, s in zip(rows, part, part_starts))
            bar.update(len(part))
    if model is None:
        model = getattr(engine, "model_path", None)
    return perplexity_from_nll(per_chunk, first=first, model=model)


def model_perplexity(model_path: str | Path, chunks: Sequence[np.ndarray], settings=None,
                     first: int | None = None, *, progress: bool = False) -> PerplexityResult:
    """Load ``model_path`` and compute its perplexity on ``chunks`` (default settings: one
    context, batch and ubatch as long as the longest chunk)."""
    from ggufopt_ray.engine import LogitsEngine, RuntimeSettings
    from ggufopt_ray.gguf.inspect import check_gguf_file

    check_gguf_file(model_path)
    if settings is None:
        n = max(len(c) for c in chunks) if len(chunks) else 2
        settings = RuntimeSettings(n_ctx=n, n_batch=n, n_ubatch=n)
    with LogitsEngine(model_path, settings) as engine:
        return evaluate_perplexity(engine, chunks, first, progress=progress, model=str(model_path))


def text_chunks(engine, text: str, n_ctx: int, max_chunks: int | None = None) -> list[np.ndarray]:
    """Chunks of ``n_ctx`` tokens cut from ``text`` as llama-perplexity cuts them (see
    :func:`ggufopt_ray.engine.tokenizer.text_chunks`)."""
    from ggufopt_ray.engine.tokenizer import text_chunks as cut

    return cut(engine, text, n_ctx, max_chunks)
