"""The results store: per chunk, a candidate's per-token comparison with one baseline.

Per-token values (KLD, top-1 agreement, Δp, NLL under both models) are kept as float32 so that
overall percentiles are exact, not sketches, and so that statistics can be recomputed at any
time (after a crash, with another stopping rule) without re-running the model. One store per
(baseline, candidate) pair; a store for another baseline or candidate is refused.
"""

from __future__ import annotations

import numpy as np

from ggufopt_ray.store.chunkdir import ChunkStore

IDENTITY_KEYS = ("baseline_id", "candidate", "imatrix_hash", "encoding", "first")


class ResultsStore(ChunkStore):
    KIND = "results"
    IDENTITY_KEYS = IDENTITY_KEYS
    REPAIR_HINT = ("rerun `ggufopt bench` (or the sweep) with the same settings: it recomputes "
                   "damaged chunks")
    REMAKE = "`ggufopt bench ... --overwrite`"

    def write(self, index: int, per_token: dict[str, np.ndarray]) -> None:
        self.dir.write_chunk(index, {k: np.asarray(v) for k, v in per_token.items()})

    def read(self, index: int) -> dict[str, np.ndarray]:
        arrays, _ = self.dir.read_chunk(index)
        return arrays

    def read_all(self) -> list[dict[str, np.ndarray]]:
        """Committed chunks in order, stopping at the first gap (a resumable prefix)."""
        out = []
        i = 0
        while self.has(i):
            out.append(self.read(i))
            i += 1
        return out
