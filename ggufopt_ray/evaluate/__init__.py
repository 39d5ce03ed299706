"""Model-level evaluations that need only logits: perplexity (KLD lives in ``metrics``)."""

from ggufopt_ray.evaluate.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    ln_ppl_ratio,
    model_perplexity,
    perplexity_from_nll,
    scoring_start,
    text_chunks,
    token_nll,
)

__all__ = [
    "PerplexityResult", "evaluate_perplexity", "ln_ppl_ratio", "model_perplexity",
    "perplexity_from_nll", "scoring_start", "text_chunks", "token_nll",
]
