"""How large the RQ-VAE's codebooks are for a catalog, and which items it trains on.

ID capacity. With ``collision: reassign`` a view ID keeps ``L = shared_levels + specific_levels`` codes, so
the items sharing a prefix (its first L-1 codes) must get different last codes: a prefix holds at most
as many items as the last level has codes. Every level has ``codebook_size`` codes except the last
specific level of each view, whose size ``last_size`` grows with the catalog:

    per_prefix = n_items / codebook_size ** (L - 1)          (expected items per prefix)
    last_size  = codebook_size                    if per_prefix <= capacity_load * codebook_size
               = smallest power of two with per_prefix <= capacity_load * last_size   otherwise

``capacity_load`` is the planned average fill of a prefix; the rest is headroom for skewed catalogs.
With the defaults (2 shared + 1 specific levels of 256, load 0.125) the last level stays at 256 up to
about 2.1M items (every catalog the project has run: Beauty, MovieLens, the generated logs), and 10M
items get 2048. ``last_codebook_size`` pins the size instead. Why the last level and not one more level:
IDs keep their length, so the downstream model's sequence layout, decoding trie and ID head keep their
shape, and its per-level vocabulary is the largest level's size (``features.load_features``:
``K = max(codebook_size, codes.max() + 1)``). A model trained with one last size cannot be warm-started
with another (its codebook has another shape): ``jobs.semantic_ids.decide`` starts cold and says why.

Training sample. The RQ-VAE trains on at most ``train_sample`` items; a catalog up to that size trains on
every item in its order, exactly as before the sample existed. The daily stage picks a larger catalog's
sample on Spark by a hash of (item_id, seed), so membership is stable from day to day
(``jobs.semantic_ids_spark.sample_index``), and passes only the sample; ``train_rows`` is the in-process
choice (``train_rqvae`` given more rows than that): a seeded uniform sample without replacement,
ascending rows. Assignment always codes every item.
"""
from __future__ import annotations

import numpy as np

from synergen_core.config import SemanticIdConfig


def last_size(cfg: SemanticIdConfig) -> int:
    """Codes of the last level of each view (the other levels have ``codebook_size``)."""
    return cfg.last_codebook_size or cfg.codebook_size


def level_sizes(cfg: SemanticIdConfig) -> list[int]:
    """Codes per raw column, in the raw codes' order [shared (S) | text-specific (T) | collab-specific (T)]."""
    K, T = cfg.codebook_size, cfg.specific_levels
    view = [K] * (T - 1) + [last_size(cfg)]
    return [K] * cfg.shared_levels + view + view


def capacity_size(cfg: SemanticIdConfig, n_items: int) -> int:
    """The last level's size for a catalog of ``n_items`` (module doc), or the pinned one."""
    if cfg.last_codebook_size is not None:
        return cfg.last_codebook_size
    K = cfg.codebook_size
    per_prefix = n_items / K ** (cfg.shared_levels + cfg.specific_levels - 1)
    if per_prefix <= cfg.capacity_load * K:
        return K
    size = 2
    while per_prefix > cfg.capacity_load * size:
        size *= 2
    return size


def with_capacity(cfg: SemanticIdConfig, n_items: int) -> SemanticIdConfig:
    """``cfg`` with ``last_codebook_size`` set for ``n_items`` when it is not ``codebook_size`` (else as is,
    so a catalog today's capacity holds keeps today's config, arch and model)."""
    size = capacity_size(cfg, n_items)
    return cfg if size == last_size(cfg) else cfg.model_copy(update={"last_codebook_size": size})


def train_rows(n_items: int, cfg: SemanticIdConfig) -> np.ndarray | None:
    """The rows the RQ-VAE trains on: None (every row, in order) up to ``train_sample`` items, else
    ``train_sample`` rows drawn without replacement by ``seed``, ascending."""
    if n_items <= cfg.train_sample:
        return None
    return np.sort(np.random.default_rng(cfg.seed).choice(n_items, cfg.train_sample, replace=False))
