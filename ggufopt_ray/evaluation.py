"""One chunk of evaluation: baseline payloads and candidate comparisons, on an engine.

The glue between the engine (logits of a chunk) and the numeric core (encodings, per-token
metrics, statistics, stopping): used alike by the single-machine CLIs and by Ray workers and
trials. Alignment follows llama-perplexity: logit row ``j`` predicts token ``j + 1``; rows
``first .. n-2`` are scored, so each chunk scores ``n - 1 - first`` tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ggufopt_ray.config import MetricsConfig
from ggufopt_ray.metrics.encodings import get_encoding
from ggufopt_ray.metrics.kld import log_softmax
from ggufopt_ray.metrics.languages import group_by_language
from ggufopt_ray.metrics.racing import RacingConfig, per_chunk_values
from ggufopt_ray.metrics.stats import summarize_chunks
from ggufopt_ray.metrics.stopping import StoppingRule


def encoding_params(name: str) -> dict:
    return dict(get_encoding(name).params())


def baseline_payload(engine, tokens: np.ndarray, encoding: str, first: int) -> dict:
    """Encoded baseline log-probabilities of the scored rows of one chunk."""
    tokens = np.asarray(tokens)
    # Only rows first..n-1 are computed (the engine marks just those as outputs); the last one
    # predicts nothing. The rows are ours, so the log-softmax overwrites them in place.
    rows = engine.logits(tokens, first=first)[:-1]
    # The reference tokens go in too: encodings keep their exact baseline log-prob (for NLL, Δp).
    # The encoder uses the engine's threads: it runs between decodes, when they are idle.
    return get_encoding(encoding).encode(log_softmax(rows, out=rows), tokens[first + 1:],
                                         threads=engine_threads(engine))


def baseline_payloads(engine, chunks: Sequence[np.ndarray], encoding: str, first: int,
                      on_payload: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Encoded baseline log-probabilities of the scored rows of each chunk (the payloads that
    ``evaluation.baseline_payload`` gives one at a time, same codes), ``engine.n_seq`` chunks per
    decode; ``on_payload(j, payload)`` is called as soon as chunk ``j``'s payload is ready (a
    writer can start on it while the others of its decode are encoded).

    The hot path of the baseline pass, shared by the Ray workers (``distributed.baseline``),
    ``ggufopt logits`` and bench/logits_throughput.py: the encoding reads each chunk's rows straight from llama.cpp's
    output buffer (``map_logits``: no 4·n_vocab-byte copy per token) and fuses the log-softmax
    into its own row-block pass (``encode_logits``) on the engine's threads, which are idle
    between decodes. Row ``j`` predicts token ``j + 1``, so the last row is not scored.
    """
    enc = get_encoding(encoding)
    threads = engine_threads(engine)
    chunks = [np.asarray(c) for c in chunks]

    def encode(j: int, rows: np.ndarray) -> dict:
        payload = enc.encode_logits(rows[:-1], chunks[j][first + 1:], threads=threads)
        if on_payload is not None:
            on_payload(j, payload)
        return payload

    return engine.map_logits(chunks, encode, first)


def engine_threads(engine) -> int:
    """The CPU threads an engine was given (the KLD step uses the same ones after each decode)."""
    return max(1, int(getattr(engine, "n_threads", 1) or 1))


def compare_logits(rows: np.ndarray, tokens: np.ndarray, payload: dict, encoding: str, first: int,
                   threads: int = 1) -> dict:
    """Per-token metrics of candidate logit rows (the scored rows) against a baseline payload."""
    targets = np.asarray(tokens)[first + 1:]
    return get_encoding(encoding).compare(payload, rows, targets, threads=threads).to_arrays()


def compare_chunk(engine, tokens: np.ndarray, payload: dict, encoding: str, first: int,
                  keep_logprobs: bool = False) -> dict:
    """Per-token metrics of a candidate (on ``engine``) against a baseline payload.

    With ``keep_logprobs`` the candidate's own log-probs of the scored rows come back too, under
    ``candidate_logprobs`` (for a candidate store).
    """
    tokens = np.asarray(tokens)
    rows = engine.logits(tokens, first=first)[:-1]  # the scored rows only; see baseline_payload
    out = compare_logits(rows, tokens, payload, encoding, first, threads=engine_threads(engine))
    if keep_logprobs:
        out["candidate_logprobs"] = log_softmax(rows, out=rows)  # rows are not needed any more
    return out


def summarize_run(per_chunk: list[dict], confidence: float = 0.95, n_boot: int = 1000):
    """RunSummary (overall + per chunk + chunk-level intervals) of the chunks evaluated so far."""
    return summarize_chunks(per_chunk, confidence=confidence, n_boot=n_boot)


def summarize(per_chunk: list[dict], n_boot: int = 1000) -> dict:
    """Overall statistics (with uncertainties) over the chunks evaluated so far, as a flat dict.

    ``n_boot`` bootstrap resamples give the composite's interval; running reports during a
    trial can use fewer than the final row."""
    return summarize_run(per_chunk, n_boot=n_boot).to_flat_dict()


def racing_config(cfg: MetricsConfig, n_chunks: int, n_candidates: int):
    """The racing rule of a sweep with ``n_chunks`` evaluation chunks and up to ``n_candidates``
    (None when racing is off, or with under 3 chunks, too few for a paired decision)."""
    cap = min(n_chunks, cfg.max_chunks or n_chunks)
    if not (cfg.early_stopping and cfg.racing) or cap < 3:
        return None
    return RacingConfig(target=cfg.target, alpha=cfg.alpha, min_paired_chunks=min(cfg.min_paired_chunks, cap),
                        max_comparisons=max(1, n_candidates - 1), max_chunks=cap, confidence=cfg.confidence,
                        margin=cfg.margin, min_chunks=min(max(3, cfg.min_chunks), cap), control=cfg.control,
                        order=cfg.chunk_order)


def stop_decision(per_chunk: list[dict], cfg: MetricsConfig) -> tuple[bool, str]:
    """Whether the target statistic is known well enough to stop, and why."""
    if not cfg.early_stopping:
        return False, "all_chunks"
    rule = StoppingRule(target=cfg.target, confidence=cfg.confidence, margin=cfg.margin,
                        min_chunks=cfg.min_chunks)
    decision = rule.decide([c["kld"] for c in per_chunk])
    return decision.stop, decision.reason


def never_stop(rule):
    """``rule`` asked after every chunk (racing posts the values to the board), its stop ignored."""

    def decide(per_chunk: list[dict]) -> tuple[bool, str]:
        rule(per_chunk)
        return False, "all_chunks"

    return decide


def every_language(rule, metrics: MetricsConfig, langs: list[str]):
    """``metrics.per_language``: a precision stop must hold in every language's own chunks (a
    candidate fine on average may be poor on the smallest language); dominance stops as it is.
    ``langs``: the language of each chunk in evaluation order."""
    def decide(per_chunk: list[dict]) -> tuple[bool, str]:
        stop, why = rule(per_chunk)
        if not stop or why.startswith("dominated_by"):
            return stop, why
        groups = group_by_language(per_chunk, list(langs)[:len(per_chunk)])
        if len(groups) < len(set(langs)):
            return False, "running"  # a language not seen yet cannot be precise
        ok = all(stop_decision([{"kld": m.kld} for m in chunks], metrics)[0] for chunks in groups.values())
        return (True, why) if ok else (False, "running")
    return decide


def chunk_id_text(ids: Sequence[int]) -> str:
    """Chunk ids as a compact string for a results row ("0-3,17-20"): rows stay flat scalars."""
    parts, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def parse_chunk_ids(text: str) -> list[int]:
    """The inverse of ``chunk_id_text``."""
    out: list[int] = []
    for part in filter(None, str(text or "").split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def chunk_kld_text(chunk_ids: Sequence[int], per_chunk: list[dict]) -> str:
    """``{chunk index: mean KLD}`` of the evaluated chunks as JSON (a results row stays flat)."""
    return json.dumps({str(i): v for i, v in zip(chunk_ids, per_chunk_values(per_chunk, "mean"))})


@dataclass
class EvaluationRun:
    """A candidate's evaluation so far: per-chunk metrics in evaluation order, and how it went."""

    per_chunk: list[dict] = field(default_factory=list)
    chunk_ids: list[int] = field(default_factory=list)  # the chunk of each per_chunk entry
    reason: str = "all_chunks"  # why it ended: all_chunks, or the stop rule's reason
    computed: int = 0  # chunks computed in this run (the others came back from the results store)
    compute_seconds: float = 0.0  # engine + comparison time of the computed chunks
    tokens_computed: int = 0
    done: bool = False  # set with the report of the last chunk evaluated
    last_computed: bool = False  # whether the latest chunk was computed (not read back)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_computed / self.compute_seconds if self.compute_seconds > 0 else float("nan")


def evaluate_candidate(n_chunks: int, tokens_of: Callable[[int], np.ndarray], payload_of: Callable[[int], dict],
                       results, open_engine: Callable[[], object], encoding: str, first: int, *,
                       stop_rule: Callable[[list[dict]], tuple[bool, str]] | None = None,
                       on_chunk: Callable[[int, EvaluationRun], None] | None = None,
                       keep_logprobs: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                       order: Sequence[int] | None = None) -> EvaluationRun:
    """The one chunk loop behind ``ggufopt bench`` and every sweep trial.

    Chunk ``i`` comes back from ``results`` (a ResultsStore) when it was committed before, so a
    rerun, a retried trial or a resumed sweep continues where it stopped; otherwise the candidate
    engine (opened on the first chunk that needs it, closed at the end) compares its logits with
    ``payload_of(i)`` and the metrics are committed. After each chunk ``stop_rule(per_chunk)``
    may end the run and ``on_chunk(i, run)`` reports (``run.done`` marks the last report).
    ``keep_logprobs(i, tokens, logprobs)`` receives the candidate's own log-probs of computed chunks.
    ``order``: the chunks to evaluate, in this order (default 0..n_chunks-1; racing staggers it).
    """
    run = EvaluationRun()
    engine = None
    order = list(range(n_chunks)) if order is None else [int(i) for i in order]
    try:
        for step, i in enumerate(order):
            run.last_computed = not results.has(i)
            if not run.last_computed:
                metrics = results.read(i)
            else:
                if engine is None:
                    engine = open_engine()
                tokens = np.asarray(tokens_of(i))
                payload = payload_of(i)
                t0 = time.perf_counter()
                metrics = compare_chunk(engine, tokens, payload, encoding, first,
                                        keep_logprobs=keep_logprobs is not None)
                run.compute_seconds += time.perf_counter() - t0
                if keep_logprobs is not None:
                    keep_logprobs(i, tokens, metrics.pop("candidate_logprobs"))
                results.write(i, metrics)
                run.computed += 1
                run.tokens_computed += len(tokens)
            run.per_chunk.append(metrics)
            run.chunk_ids.append(i)
            stop, why = stop_rule(run.per_chunk) if stop_rule is not None else (False, "all_chunks")
            end = step == len(order) - 1
            if stop and not (end and len(order) == n_chunks):  # a stop at the very last chunk is all_chunks
                run.reason = why
            run.done = bool(stop or end)
            if on_chunk is not None:
                on_chunk(i, run)
            if stop:
                break
    finally:
        if engine is not None:
            engine.close()
    return run
