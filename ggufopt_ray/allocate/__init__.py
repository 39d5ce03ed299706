"""Sensitivity-guided allocation of quant types to tensor groups: the numeric core.

The pipeline, one module per step (numpy/scipy only; no Ray, no llama.cpp):

- :mod:`.groups`     tensor kind x layer band groups, each with a ``--tensor-type`` regex matching
                     exactly its tensors, and a choice ``{group: type}`` -> override list;
- :mod:`.predictor`  measured single-group ΔKLD + exact per-(group, type) bytes -> additive
                     prediction of any mix, and its correction from measured mixes;
- :mod:`.knapsack`   the exact (bytes, predicted KLD) Pareto frontier over all mixes;
- :mod:`.loop`       predict -> measure the promising frontier points -> correct -> re-solve;
- :mod:`.recommend`  the best measured mix per size class, its ``--tensor-type-file``, the
                     llama-quantize command line and a model-card table.
"""
