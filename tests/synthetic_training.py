"""Synthetic training input, small enough for a unit test: users browsing one of four item clusters and
searching with queries that name a cluster (``synthetic_split``), random text vectors with unique semantic
IDs (``synthetic_features``), and a tiny model and training config (``synthetic_config``). Plain functions,
not fixtures: the torchrun and SIGKILL tests import them in processes of their own."""
import numpy as np
import torch

from synergen_core.config import Config, ModelConfig, TrainConfig
from synergen_core.data import SplitData, Tokens, holdout_last, item_counts, make_windows
from synergen_core.model.embeddings import TokenType
from synergen_core.features import Features

I, Q = int(TokenType.ITEM), int(TokenType.QUERY)
N_ITEMS, N_QUERIES, D_TEXT, K = 41, 11, 16, 8


def tokens_of(rows: list[list[tuple]]) -> Tokens:
    """rows of (type, item, query, ts) -> Tokens with positions 0.. per row."""
    flat = [t for r in rows for t in r]
    col = lambda j: np.array([t[j] for t in flat], np.int64)  # noqa: E731
    return Tokens(
        offsets=np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
        token_type=col(0), item_idx=col(1), query_idx=col(2),
        action=np.ones(len(flat), np.int64), surface=np.where(col(0) == Q, 1, 2),
        position=np.concatenate([np.arange(len(r)) for r in rows]).astype(np.int64) if flat else np.zeros(0, np.int64),
        ts=np.array([t[3] for t in flat], np.float64),
    )


def synthetic_tokens(n_users: int = 24, seed: int = 0) -> Tokens:
    """Users who browse one of four item clusters and search with queries that name a cluster."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        cluster, t, row = u % 4, 1.7e9 + 1000.0 * u, []
        for _ in range(rng.integers(8, 14)):
            t += float(rng.integers(10, 5000))
            item = 1 + cluster * 10 + int(rng.integers(0, 10))
            if rng.random() < 0.3:
                row.append((Q, 0, 1 + cluster + 4 * int(rng.integers(0, 2)), t))
            row.append((I, item, 0, t))
        rows.append(row)
    return tokens_of(rows)


def synthetic_split(L: int = 8) -> SplitData:
    tok = synthetic_tokens()
    train, valid = holdout_last(tok, L)
    return SplitData("loo", N_ITEMS, N_QUERIES, None, None, train, make_windows(train, L), valid,
                     item_counts(train, N_ITEMS))


def synthetic_features() -> Features:
    g = torch.Generator().manual_seed(0)
    i = torch.arange(N_ITEMS)
    rec = torch.stack([i % K, (i // K) % K], 1)
    search = torch.stack([i % K, (i // K + 3) % K], 1)
    return Features(torch.randn(N_ITEMS, D_TEXT, generator=g), torch.randn(N_QUERIES, D_TEXT, generator=g),
                    rec, search, K, {})


def synthetic_config(**train) -> Config:
    """d_model 16, one layer, 2 epochs of batches of 4, a checkpoint every 3 steps; ``train`` overrides
    TrainConfig fields. (Not conftest's ``small_config``, which is for the MovieLens slice.)"""
    cfg = Config()
    cfg.model = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.1)
    base = dict(epochs=2, batch_size=4, checkpoint_every=3, progress=False, rank_pop_negatives=2,
                rank_hard_negatives=1)
    cfg.train = TrainConfig(**{**base, **train})
    return cfg
