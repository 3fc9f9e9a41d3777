"""A tiny SynerGen model (d_model 32, two layers, a 30-item catalog with unique semantic IDs in both views)
and a batch of three rows for it (a search request, a right-padded and a left-padded row, with candidates
unless asked not to). Shared by tests/test_model_synergen.py and tests/test_score.py."""
import torch

from synergen_core.config import ModelConfig
from synergen_core.model.embeddings import TokenType
from synergen_core.model import SynerGen

N_ITEMS, N_QUERIES, N_ACTIONS, N_SURFACES, D_TEXT, LEVELS, K = 30, 10, 5, 4, 12, 2, 8
I, Q, P = TokenType.ITEM, TokenType.QUERY, TokenType.PAD


def _catalog(seed=0):
    g = torch.Generator().manual_seed(seed)
    item_text = torch.randn(N_ITEMS, D_TEXT, generator=g)
    query_text = torch.randn(N_QUERIES, D_TEXT, generator=g)
    i = torch.arange(N_ITEMS)
    # unique IDs in both views, sharing the first level as GenSAR's shared codebooks do
    rec_codes = torch.stack([i % K, (i // K) % K], dim=1)
    search_codes = torch.stack([i % K, (i // K + 2) % K], dim=1)
    return item_text, query_text, rec_codes, search_codes


def tiny_model(seed=0, views=("rec", "search"), **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, **overrides)
    item_text, query_text, rec_codes, search_codes = _catalog()
    return SynerGen(
        cfg, n_items=N_ITEMS, n_queries=N_QUERIES, n_actions=N_ACTIONS, n_surfaces=N_SURFACES,
        item_text=item_text, query_text=query_text,
        item_codes=rec_codes if "rec" in views else None,
        search_codes=search_codes if "search" in views else None,
        codebook_size=K,
    )


def _row(types, items, queries, events):
    # tokens of one event (a query and the item it engaged) share the event's time
    ts = [1.7e9 + 600.0 * e + 7.0 * e * e for e in events]
    return dict(
        token_type=types, item_idx=items, query_idx=queries,
        action=[1 + (i % 3) if t == I else 0 for i, t in enumerate(types)],
        surface=[1 + (i % 2) if t != P else 0 for i, t in enumerate(types)],
        ts=ts, position=list(range(len(types))),
    )


def tiny_batch(with_candidates=True):
    rows = [
        # Q4 engaged I7; ends with a search request (Q2)
        _row([I, Q, I, I, I, Q], [3, 0, 7, 8, 2, 0], [0, 4, 0, 0, 0, 2], [0, 1, 1, 2, 3, 4]),
        # Q1 engaged nothing, I9 is a later browse event
        _row([I, I, Q, I, I, I], [5, 6, 0, 9, 1, 4], [0, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5]),
        # Q5 engaged I13
        _row([Q, I, I, Q, I, I], [0, 11, 12, 0, 13, 14], [3, 0, 0, 5, 0, 0], [0, 1, 2, 3, 3, 4]),
    ]
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    batch["ts"] = batch["ts"].to(torch.float64)
    # right-pad row 1 and left-pad row 2 to exercise both sides
    for k in ("token_type", "item_idx", "query_idx", "action", "surface"):
        batch[k][1, 4:] = 0
        batch[k][2, :2] = 0
    if with_candidates:
        batch["candidates"] = torch.tensor([[7, 15, 16, 0], [20, 21, 22, 23], [24, 25, 0, 0]])
        batch["labels"] = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    return batch
