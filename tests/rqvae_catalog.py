"""A generated catalog for the RQ-VAE tests (tests/test_rqvae.py, tests/test_semantic_ids_spark.py)."""
from __future__ import annotations

import numpy as np

from synergen_core.vectors import unit_rows


def catalog(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # items on a 6-d manifold around 12 topics, seen through a text-like and a collaborative-like view
    rng = np.random.default_rng(seed)
    topics = 2 * np.random.default_rng(100).normal(size=(12, 6))
    to_text = np.random.default_rng(101).normal(size=(6, 32))
    to_collab = np.random.default_rng(102).normal(size=(6, 16))
    z = topics[rng.integers(0, 12, n)] + rng.normal(size=(n, 6))
    t = np.tanh(z @ to_text / 3) + 0.05 * rng.normal(size=(n, 32))
    c = z @ to_collab + 0.05 * rng.normal(size=(n, 16))
    # normalized in float64, then float32
    return unit_rows(t, None).astype(np.float32), unit_rows(c, None).astype(np.float32)
