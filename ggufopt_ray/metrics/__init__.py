"""The numeric core: per-token KL divergence, statistics with uncertainties, early stopping.

numpy/scipy only (no llama.cpp, Ray or HDF5 here), so every number can be tested in isolation.

- ``kld``: ``kld_per_token(base_logprobs, candidate_logits, ref_tokens) -> TokenMetrics`` (KLD,
  top-1 agreement, Δp, NLL under both models, float32 per token) and ``log_softmax``.
- ``encodings``: how baseline log-probs are stored (``get_encoding(name, **params)``: exact,
  float16, llamacpp_uint16, topk, compact) and the KLD each allows (``kld_against``).
- ``stats``: per chunk and overall statistics (``summarize``, ``summarize_chunks``), the composite
  score, chunk bootstrap.
- ``stopping``: ``StoppingRule``/``decide`` and the serializable ``StoppingState``/``update``.

Import from the submodules; this package imports nothing so that ``import`` stays cheap.
"""
