"""One chunk of evaluation: baseline payloads and candidate comparisons, on an engine.

The glue between the engine (logits of a chunk) and the numeric core (encodings, per-token
metrics, statistics, stopping): used alike by the single-machine CLIs and by Ray workers and
trials. Alignment follows llama-perplexity: logit row ``j`` predicts token ``j + 1``; rows
``first .. n-2`` are scored, so each chunk scores ``n - 1 - first`` tokens.
"""

from __future__ import annotations

import numpy as np

from ggufopt_ray.config import MetricsConfig


def scored_rows(n_tokens: int, first: int) -> slice:
    return slice(first, n_tokens - 1)


def encoding_params(name: str) -> dict:
    from ggufopt_ray.metrics.encodings import get_encoding

    return dict(get_encoding(name).params())


def baseline_payload(engine, tokens: np.ndarray, encoding: str, first: int) -> dict:
    """Encoded baseline log-probabilities of the scored rows of one chunk."""
    from ggufopt_ray.metrics.encodings import get_encoding
    from ggufopt_ray.metrics.kld import log_softmax

    logits = engine.logits(tokens)
    # The reference tokens go in too: encodings keep their exact baseline log-prob (for NLL, Δp).
    return get_encoding(encoding).encode(log_softmax(logits[scored_rows(len(tokens), first)]),
                                         np.asarray(tokens)[first + 1:])


def compare_logits(rows: np.ndarray, tokens: np.ndarray, payload: dict, encoding: str, first: int) -> dict:
    """Per-token metrics of candidate logit rows (the scored rows) against a baseline payload."""
    from ggufopt_ray.metrics.encodings import get_encoding

    targets = np.asarray(tokens)[first + 1:]
    return get_encoding(encoding).compare(payload, rows, targets).to_arrays()


def compare_chunk(engine, tokens: np.ndarray, payload: dict, encoding: str, first: int,
                  keep_logprobs: bool = False) -> dict:
    """Per-token metrics of a candidate (on ``engine``) against a baseline payload.

    With ``keep_logprobs`` the candidate's own log-probs of the scored rows come back too, under
    ``candidate_logprobs`` (for a candidate store).
    """
    tokens = np.asarray(tokens)
    rows = engine.logits(tokens)[scored_rows(len(tokens), first)]
    out = compare_logits(rows, tokens, payload, encoding, first)
    if keep_logprobs:
        from ggufopt_ray.metrics.kld import log_softmax

        out["candidate_logprobs"] = log_softmax(rows)
    return out


def summarize_run(per_chunk: list[dict], confidence: float = 0.95, n_boot: int = 1000):
    """RunSummary (overall + per chunk + chunk-level intervals) of the chunks evaluated so far."""
    from ggufopt_ray.metrics.stats import summarize_chunks

    return summarize_chunks(per_chunk, confidence=confidence, n_boot=n_boot)


def summarize(per_chunk: list[dict], n_boot: int = 1000) -> dict:
    """Overall statistics (with uncertainties) over the chunks evaluated so far, as a flat dict.

    ``n_boot`` bootstrap resamples give the composite's interval; running reports during a
    trial can use fewer than the final row."""
    return summarize_run(per_chunk, n_boot=n_boot).to_flat_dict()


def stop_decision(per_chunk: list[dict], cfg: MetricsConfig) -> tuple[bool, str]:
    """Whether the target statistic is known well enough to stop, and why."""
    if not cfg.early_stopping:
        return False, "all_chunks"
    from ggufopt_ray.metrics.stopping import StoppingRule

    rule = StoppingRule(target=cfg.target, confidence=cfg.confidence, margin=cfg.margin,
                        min_chunks=cfg.min_chunks)
    decision = rule.decide([c["kld"] for c in per_chunk])
    return decision.stop, decision.reason
