"""Seeded synthetic raw logs: the embedded default input of the main job and the scale benchmarks' input.

``run`` writes ``generate.days`` days of ``raw/{catalog,search_events,browse_events}/ds=D`` partitions.
Everything is vectorized (numpy + Arrow compute) and built one day at a time, so memory follows the
events of one day, not of the run. Same seed and config give byte-identical Parquet files.

What the data looks like:

* a catalog with 2-level categories, brands and templated titles; new items arrive every day and a
  few descriptions change (a day's partition holds only those rows, day 1 the initial catalog);
* Zipf-like popularity of items, categories and users; each user has a preferred category that
  drifts over days; sessions of a few events seconds to minutes apart, a user's sessions hours apart;
* search events whose query is a few words of the engaged item's text (a few engage nothing), browse
  events with a surface and a rating for "rate"; impressions around the engaged item;
* valid late events (written up to ``validate.late_days`` days after their day) and exact duplicates;
* a share of malformed rows, one defect each, labelled with the quarantine codes of schemas.reasons.
  The returned ground truth counts them per table, day and code, so validation can be checked exactly.
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import C, reasons
from schemas.raw import BROWSE_ACTIONS, BROWSE_EVENTS, CATALOG, SEARCH_ACTIONS, SEARCH_EVENTS, TS_TYPE
from synergen_core import lake
from synergen_core.config import Config, GenerateConfig, parse_ds

DAY_US = 86_400_000_000
S_US = 1_000_000

# --- words ------------------------------------------------------------------------------------
TOPS = {
    "Electronics": ["headphones", "speaker", "charger", "keyboard", "monitor", "camera", "tablet", "router"],
    "Home": ["lamp", "pillow", "blanket", "curtain", "rug", "mirror", "clock", "vase"],
    "Kitchen": ["kettle", "blender", "skillet", "knife", "mug", "toaster", "cutting board", "coffee grinder"],
    "Sports": ["yoga mat", "dumbbell", "tennis racket", "football", "cycling helmet", "jump rope",
               "water bottle", "backpack"],
    "Beauty": ["shampoo", "face cream", "lipstick", "perfume", "hair dryer", "nail polish", "sunscreen", "razor"],
    "Toys": ["puzzle", "doll", "toy car", "building blocks", "board game", "plush bear", "kite", "drone"],
    "Books": ["novel", "cookbook", "notebook", "atlas", "comic", "biography", "journal", "dictionary"],
    "Garden": ["hose", "planter", "shovel", "seed kit", "bird feeder", "lawn chair", "pruner", "watering can"],
    "Office": ["desk chair", "stapler", "pen set", "desk organizer", "printer paper", "whiteboard",
               "label maker", "file cabinet"],
    "Pets": ["dog bed", "cat toy", "leash", "pet bowl", "aquarium", "bird cage", "scratching post", "dog food"],
    "Fashion": ["sneakers", "jacket", "scarf", "wallet", "sunglasses", "watch", "hat", "belt"],
    "Automotive": ["car mat", "tire gauge", "seat cover", "dash cam", "phone mount", "car vacuum",
                   "wiper blade", "jump starter"],
}
QUALIFIERS = ["mini", "pro", "smart", "travel", "classic", "kids", "deluxe", "outdoor", "compact"]
ADJECTIVES = [
    "wooden", "wireless", "portable", "stainless", "organic", "vintage", "ergonomic", "waterproof",
    "lightweight", "premium", "soft", "modern", "heavy duty", "foldable", "rechargeable", "recycled",
    "slim", "cozy", "rugged", "bamboo", "ceramic", "leather", "cotton", "digital", "quiet", "bright",
    "adjustable", "magnetic", "insulated", "handmade",
]
BRANDS = [
    "acme", "northwind", "lumina", "voltix", "brightleaf", "zephyr", "oakridge", "nimbus", "solace",
    "kestrel", "vireo", "quanta", "harbor", "everpeak", "corvid", "juniper", "tessel", "fjordline",
    "calder", "mistral", "pinecrest", "orbita", "halcyon", "marlow", "redwing", "sundial", "tundra",
    "velvra", "wexley", "yarrow", "zenith", "astor", "bramble", "cobalt", "driftwood", "ember",
    "fable", "granite", "hollis", "ivory",
]
FEATURES = [
    "Great for everyday use.", "Two-year warranty.", "Ships in recycled packaging.", "Easy to clean.",
    "A customer favourite.", "Designed for small spaces.", "Gift ready.", "Built to last.",
    "Now in new colours.", "Backed by a 30-day return policy.", "Assembled in minutes.",
    "Tested by our experts.",
]
MODELS = [f"{letter}{n}" for letter in "ACEKLMPRSTVXZ" for n in range(100, 1000, 90)]

# --- behaviour (why these numbers: they give the shapes real logs have, at any scale) ----------
ITEM_ZIPF = 1.0  # item popularity ~ rank^-1: the top 10% of items take most engagements
CATEGORY_ZIPF = 0.8  # category sizes, hence category popularity
USER_ZIPF = 0.5  # milder: heavy users exist but do not own the log
BRAND_SPREAD = 6  # brands specialise: each top category draws from a few neighbouring brands
SESSION_MEAN_EVENTS = 5
GAP_MIN_S, GAP_MEAN_S = 2.0, 40.0  # within a session: seconds to minutes
# A user's sessions fall in distinct hourly slots, stride 5 h apart: a session starts in the first
# 12 minutes of its slot and lasts at most 16, so sessions of one user are >30 minutes apart.
SLOTS, SLOT_STRIDE = 24, 5
SESSION_START_WINDOW_S, SESSION_MAX_S = 12 * 60, 16 * 60
PREFERRED_SESSION_SHARE = 0.7  # sessions about the user's preferred category (else a popular one)
SESSION_FOCUS = 0.85  # events of a session within its category (else anything popular)
REPEAT_SHARE = 0.25  # events that come back to the session's previous item (view, then cart...)
POSITION_BIAS = 0.35  # the engaged item's position in impressions: geometric, top-heavy
LATE_SESSION_SHARE = 0.02  # whole sessions uploaded up to late_days days later
DUPLICATE_SHARE = 0.003  # exact resends of a row (same event id)
CHANGED_ITEM_SHARE_PER_DAY = 0.005  # catalog rows whose description changes on a day
UNKNOWN_ITEM_BASE, UNKNOWN_ITEM_POOL = 10**12, 1000  # ids far above any catalog id

SEARCH_ACTION_P = {"none": 0.08, "click": 0.6, "add_to_cart": 0.12, "purchase": 0.06, "tag": 0.07, "review": 0.07}
BROWSE_ACTION_P = {"view": 0.5, "click": 0.25, "add_to_cart": 0.1, "purchase": 0.05, "rate": 0.07, "review": 0.03}
RATING_P = [0.05, 0.07, 0.15, 0.33, 0.40]  # ratings 1..5
SURFACE_P = {"home": 0.35, "detail": 0.3, "category": 0.15, "recommendations": 0.15, "cart": 0.05}
# Malformed actions: made-up ones and the other table's, which a careless merge would produce.
SEARCH_BAD_ACTIONS = ("share", "hover", "view", "rate")
BROWSE_BAD_ACTIONS = ("share", "wishlist", "none", "tag")
EMPTY_QUERIES = ("", "   ")

ACTIONS = tuple(dict.fromkeys(SEARCH_ACTIONS + BROWSE_ACTIONS + SEARCH_BAD_ACTIONS + BROWSE_BAD_ACTIONS))
A = {a: i for i, a in enumerate(ACTIONS)}
SURFACES = tuple(SURFACE_P)
N_QUERY_FORMS = 4  # per item: leaf, brand + leaf, adjective + leaf, top category + leaf

SEARCH_REASONS = (
    reasons.null(C.EVENT_ID), reasons.null(C.USER_ID), reasons.null(C.TS), reasons.null(C.QUERY),
    reasons.TS_OUTSIDE_DAY, reasons.UNKNOWN_ACTION, reasons.EMPTY_QUERY, reasons.UNKNOWN_ITEM,
)
BROWSE_REASONS = (
    reasons.null(C.EVENT_ID), reasons.null(C.USER_ID), reasons.null(C.TS), reasons.null(C.ITEM_ID),
    reasons.TS_OUTSIDE_DAY, reasons.UNKNOWN_ACTION, reasons.UNKNOWN_ITEM, reasons.BAD_VALUE,
)
CATALOG_REASONS = (reasons.DUPLICATE_ITEM_ID, reasons.null(C.TITLE))
EVENT_REASONS = tuple(dict.fromkeys(SEARCH_REASONS + BROWSE_REASONS))  # index = code in the "reason" array

MATERIALIZE_ROWS = 1 << 20  # rows per Arrow chunk: bounds temporaries and string offsets


# --- small helpers ----------------------------------------------------------------------------
def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers, pa.int64()), pa.string()), "")


def _zipf(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Weights rank^-exponent over a random permutation of n things."""
    return (rng.permutation(n) + 1.0) ** -exponent


def _draw(rng: np.random.Generator, cumulative: np.ndarray, m: int) -> np.ndarray:
    """m indices drawn proportionally to the weights whose cumulative sum is given."""
    u = rng.random(m) * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1)


def _choice(rng: np.random.Generator, probs: dict[str, float], m: int, codes: dict[str, int] | None = None):
    keys = list(probs)
    p = np.array([probs[k] for k in keys])
    picked = rng.choice(len(keys), size=m, p=p / p.sum())
    lookup = np.array([codes[k] for k in keys] if codes else range(len(keys)), dtype=np.int16)
    return lookup[picked]


def _join(*parts, sep: str = " ") -> pa.Array:
    return pc.binary_join_element_wise(*parts, sep)


def _group_rank(keys: np.ndarray) -> np.ndarray:
    """0, 1, 2... within each group of equal keys, in the order rows appear."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    n = len(keys)
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - start
    return rank


def _category_names(n: int) -> tuple[list[str], list[str]]:
    """(top, leaf) names of n categories: leaves round-robin over tops, then qualified, then numbered."""
    tops = list(TOPS)
    top_names, leaf_names = [], []
    per_top = len(next(iter(TOPS.values())))
    for c in range(n):
        top = tops[c % len(tops)]
        leaf = TOPS[top][(c // len(tops)) % per_top]
        level = c // (len(tops) * per_top)
        if level:
            leaf = f"{QUALIFIERS[(level - 1) % len(QUALIFIERS)]} {leaf}"
            if level > len(QUALIFIERS):
                leaf = f"{leaf} {(level - 1) // len(QUALIFIERS) + 1}"
        top_names.append(top)
        leaf_names.append(leaf)
    return top_names, leaf_names


def _words(words: list[str]) -> tuple[pa.Array, pa.Array]:
    """(lower case, Title Case) lookups."""
    low = pc.utf8_lower(pa.array(words, pa.string()))
    return low, pc.utf8_title(low)


# --- catalog ----------------------------------------------------------------------------------
class Catalog:
    """Items known so far (appended, so an item's index never changes) and samplers over them."""

    def __init__(self, rng: np.random.Generator, n_categories: int):
        tops, leaves = _category_names(n_categories)
        top_names = list(TOPS)
        self.n_categories = n_categories
        self.cat_top = np.array([top_names.index(t) for t in tops])
        self.cat_weight = _zipf(rng, n_categories, CATEGORY_ZIPF)
        self.top_l, self.top_t = _words(top_names)
        self.leaf_l, self.leaf_t = _words(leaves)
        self.brand_l, self.brand_t = _words(BRANDS)
        self.adj_l, self.adj_t = _words(ADJECTIVES)
        self.model_t = pa.array(MODELS)
        self.feature_t = pa.array(FEATURES)
        self.attrs = {k: np.empty(0, np.int32) for k in ("cat", "brand", "adj", "model", "feature")}
        self.weight = np.empty(0)
        self.n_initial = 0
        self.queries = pa.array([], pa.string())

    @property
    def n(self) -> int:
        return len(self.weight)

    def random_attrs(self, rng: np.random.Generator, m: int, cat: np.ndarray) -> dict[str, np.ndarray]:
        near = rng.zipf(2.0, m) - 1  # brands specialise: mostly the top category's first brands
        brand = (self.cat_top[cat] * (len(BRANDS) // len(TOPS)) + np.minimum(near, BRAND_SPREAD)) % len(BRANDS)
        return {
            "cat": cat.astype(np.int32),
            "brand": brand.astype(np.int32),
            "adj": rng.integers(0, len(ADJECTIVES), m, dtype=np.int32),
            "model": rng.integers(0, len(MODELS), m, dtype=np.int32),
            "feature": rng.integers(0, len(FEATURES), m, dtype=np.int32),
        }

    def add(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """Append m items; return their indices."""
        if m == 0:
            return np.empty(0, np.int64)
        if self.n == 0:
            # every category gets an item first, the rest follow category sizes
            k = min(m, self.n_categories)
            cat = np.concatenate([rng.permutation(self.n_categories)[:k],
                                  _draw(rng, np.cumsum(self.cat_weight), m - k)])
            weight = _zipf(rng, m, ITEM_ZIPF)
            self.n_initial = m
        else:
            cat = _draw(rng, np.cumsum(self.cat_weight), m)
            weight = rng.integers(1, self.n_initial + 1, m) ** -ITEM_ZIPF
        new = self.random_attrs(rng, m, cat)
        first = self.n
        self.attrs = {k: np.concatenate([self.attrs[k], new[k]]) for k in self.attrs}
        self.weight = np.concatenate([self.weight, weight])
        self.queries = pa.concat_arrays([self.queries, self._query_forms(new)])
        self._index()
        return np.arange(first, self.n)

    def _query_forms(self, a: dict[str, np.ndarray]) -> pa.Array:
        """N_QUERY_FORMS lower-case queries per item, item-major (item i's are i*N .. i*N+N-1)."""
        leaf = self.leaf_l.take(a["cat"])
        forms = [
            leaf,
            _join(self.brand_l.take(a["brand"]), leaf),
            _join(self.adj_l.take(a["adj"]), leaf),
            _join(self.top_l.take(self.cat_top[a["cat"]]), leaf),
        ]
        m = len(a["cat"])
        interleave = (np.arange(m)[:, None] + np.arange(N_QUERY_FORMS)[None, :] * m).ravel()
        return pa.concat_arrays(forms).take(pa.array(interleave))

    def _index(self) -> None:
        """Items sorted by (category, popularity desc) with cumulative weights, for vectorized draws."""
        cat = self.attrs["cat"]
        self.order = np.lexsort((-self.weight, cat)).astype(np.int32)
        self.cum = np.cumsum(self.weight[self.order])
        self.pos = np.empty(self.n, np.int64)
        self.pos[self.order] = np.arange(self.n)
        self.cat_size = np.bincount(cat, minlength=self.n_categories)
        self.cat_start = np.concatenate([[0], np.cumsum(self.cat_size)[:-1]])
        cum0 = np.concatenate([[0.0], self.cum])
        self.cat_lo = cum0[self.cat_start]
        self.cat_hi = cum0[self.cat_start + self.cat_size]
        self.cat_cum = np.cumsum(self.cat_hi - self.cat_lo)
        self.item_ids = _ids("i", np.arange(self.n))

    def sample_categories(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return _draw(rng, self.cat_cum, m)

    def sample_items(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return self.order[_draw(rng, self.cum, m)]

    def sample_in(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """One item per entry of cats, by popularity within that category."""
        u = self.cat_lo[cats] + rng.random(len(cats)) * (self.cat_hi - self.cat_lo)[cats]
        pos = np.searchsorted(self.cum, u, side="right")
        pos = np.clip(pos, self.cat_start[cats], self.cat_start[cats] + self.cat_size[cats] - 1)
        return self.order[pos]

    def impressions(self, rng: np.random.Generator, items: np.ndarray, k: int) -> np.ndarray:
        """k distinct items shown per event: the item among its category's neighbours in popularity.

        Categories with fewer than k items spill over into the next ones."""
        at = np.minimum(rng.geometric(POSITION_BIAS, len(items)) - 1, k - 1)
        pos = self.pos[items]
        c = self.attrs["cat"][items]
        small = self.cat_size[c] < k
        lo = np.where(small, 0, self.cat_start[c])
        span = np.where(small, self.n, self.cat_size[c])
        first = np.mod(pos - lo - at, span)
        shown = first[:, None] + np.arange(k)[None, :]
        # a window wraps at most once inside its span (k <= span): subtracting is cheaper than mod
        shown -= (shown >= span[:, None]) * span[:, None]
        if k > self.n:
            shown = np.mod(shown, span[:, None])
        return self.order[shown + lo[:, None]]

    def rows(self, items: np.ndarray, attrs: dict[str, np.ndarray] | None = None,
             ids: pa.Array | None = None, null_title: bool = False) -> pa.Table:
        """Catalog rows for items (or for explicit attrs and ids)."""
        a = attrs if attrs is not None else {k: v[items] for k, v in self.attrs.items()}
        brand_t = self.brand_t.take(a["brand"])
        adj_l = self.adj_l.take(a["adj"])
        leaf_l = self.leaf_l.take(a["cat"])
        m = len(a["cat"])
        title = _join(brand_t, self.adj_t.take(a["adj"]), self.leaf_t.take(a["cat"]), self.model_t.take(a["model"]))
        if null_title:
            title = pa.nulls(m, pa.string())
        desc = _join(pc.utf8_capitalize(_join(adj_l, leaf_l)), "by", pc.binary_join_element_wise(brand_t, ".", ""),
                     self.feature_t.take(a["feature"]))
        paths = np.stack([self.cat_top[a["cat"]], a["cat"]], axis=1).ravel()
        values = pa.concat_arrays([self.top_t, self.leaf_t]).take(
            pa.array(paths + np.tile([0, len(self.top_t)], m)))
        cats = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * m + 1, 2, dtype=np.int32)), values)
        ids = ids if ids is not None else self.item_ids.take(pa.array(items))
        return pa.Table.from_arrays([ids, title, desc, cats, brand_t], schema=CATALOG)


def catalog_day(rng: np.random.Generator, catalog: Catalog, g: GenerateConfig, day: int,
                junk_base: int) -> tuple[pa.Table, dict]:
    """Grow the catalog for one day; return the day's partition (added or changed rows + planted
    malformed rows at the end) and its ground truth."""
    n_new = g.items if day == 0 else round(g.items * g.new_item_share_per_day)
    n_changed = 0 if day == 0 else min(round(catalog.n * CHANGED_ITEM_SHARE_PER_DAY), catalog.n)
    changed = np.sort(rng.choice(catalog.n, n_changed, replace=False)) if n_changed else np.empty(0, np.int64)
    if n_changed:
        f = catalog.attrs["feature"]
        f[changed] = (f[changed] + rng.integers(1, len(FEATURES), n_changed)) % len(FEATURES)
    new = catalog.add(rng, n_new)
    rows = np.concatenate([changed, new])
    valid = catalog.rows(rows)

    n_bad = round(len(rows) * g.malformed_share)
    n_dup, n_null = (n_bad + 1) // 2, n_bad // 2
    n_dup = min(n_dup, len(rows))
    dup_of = rows[rng.choice(len(rows), n_dup, replace=False)] if n_dup else np.empty(0, np.int64)
    dup_attrs = {k: v[dup_of] for k, v in catalog.attrs.items()}
    # a different adjective, so the second row really disagrees with the first
    dup_attrs["adj"] = (dup_attrs["adj"] + rng.integers(1, len(ADJECTIVES), n_dup)) % len(ADJECTIVES)
    dups = catalog.rows(dup_of, attrs=dup_attrs)
    # null titles go on ids no event ever references, so breaking them breaks nothing downstream
    junk_attrs = catalog.random_attrs(rng, n_null, catalog.sample_categories(rng, n_null))
    junk = catalog.rows(None, attrs=junk_attrs, ids=_ids("i", junk_base + np.arange(n_null)), null_title=True)
    bad = pa.concat_tables([dups, junk])
    bad = bad.take(pa.array(rng.permutation(bad.num_rows)))
    table = pa.concat_tables([valid, bad])
    truth = {
        "rows": table.num_rows,
        "malformed": {reasons.DUPLICATE_ITEM_ID: n_dup, reasons.null(C.TITLE): n_null},
        "new_items": int(n_new),
        "changed_items": int(n_changed),
    }
    return table, truth


# --- users ------------------------------------------------------------------------------------
class Users:
    def __init__(self, rng: np.random.Generator, n: int, catalog: Catalog):
        self.cum = np.cumsum(_zipf(rng, n, USER_ZIPF))
        self.phase = rng.integers(0, SLOTS, n)  # the hour a user is usually active
        self.pref = catalog.sample_categories(rng, n)
        self.ids = pa.concat_arrays([_ids("u", np.arange(n)), pa.nulls(1, pa.string())])

    def drift(self, rng: np.random.Generator, share: float, catalog: Catalog) -> None:
        moved = np.flatnonzero(rng.random(len(self.pref)) < share)
        self.pref[moved] = catalog.sample_categories(rng, len(moved))

    def sample(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return _draw(rng, self.cum, m)


# --- events -----------------------------------------------------------------------------------
# One day's events as parallel numpy arrays. Codes: user -1 = null; item -1 = null, <= -2 = unknown
# id number (-2 - item); query -1 = null, <= -2 = EMPTY_QUERIES[-2 - query]; reason -1 = valid.
EVENT_KEYS = ("num", "user", "ts", "ts_null", "item", "search", "action", "query", "value", "value_null",
              "surface", "imp", "arrival", "target", "reason", "late", "dup", "eid_null")


def _take(ev: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in ev.items()}


def _concat(evs: list[dict]) -> dict:
    return {k: np.concatenate([e[k] for e in evs]) for k in EVENT_KEYS}


def _session_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    lengths = np.empty(0, np.int64)
    if n <= 0:
        return lengths
    while lengths.sum() < n:
        lengths = np.concatenate([lengths, rng.geometric(1 / SESSION_MEAN_EVENTS, n // SESSION_MEAN_EVENTS + 16)])
    cum = np.cumsum(lengths)
    last = int(np.searchsorted(cum, n))
    lengths = lengths[: last + 1]
    lengths[-1] -= cum[last] - n
    return lengths


def day_events(rng: np.random.Generator, n: int, day: int, n_days: int, day_us: int, first_num: int,
               catalog: Catalog, users: Users, g: GenerateConfig, late_days: int, max_value: float) -> dict:
    """n valid events of one day (some of them late sessions, to be written on a later day)."""
    lengths = _session_lengths(rng, n)
    s = len(lengths)
    sess = np.repeat(np.arange(s), lengths)
    starts = np.cumsum(lengths) - lengths
    first = np.zeros(n, dtype=bool)
    first[starts] = True

    user_s = users.sample(rng, s)
    slot = (users.phase[user_s] + _group_rank(user_s) * SLOT_STRIDE) % SLOTS
    start_us = day_us + slot * 3600 * S_US + rng.integers(0, SESSION_START_WINDOW_S * S_US, s)
    gaps = GAP_MIN_S + rng.exponential(GAP_MEAN_S, n)
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed = np.minimum(elapsed - elapsed[starts][sess], SESSION_MAX_S)
    ts = start_us[sess] + (elapsed * S_US).astype(np.int64)

    cat_s = np.where(rng.random(s) < PREFERRED_SESSION_SHARE, users.pref[user_s], catalog.sample_categories(rng, s))
    focus = rng.random(n) < SESSION_FOCUS
    item = np.empty(n, np.int64)
    item[focus] = catalog.sample_in(rng, cat_s[sess[focus]])
    item[~focus] = catalog.sample_items(rng, int((~focus).sum()))
    repeat = (rng.random(n) < REPEAT_SHARE) & ~first
    item = item[np.maximum.accumulate(np.where(repeat, 0, np.arange(n)))]

    search = rng.random(n) < g.search_share
    action = np.where(search, _choice(rng, SEARCH_ACTION_P, n, A), _choice(rng, BROWSE_ACTION_P, n, A))
    query = np.where(search, item * N_QUERY_FORMS + rng.integers(0, N_QUERY_FORMS, n), -1)
    rate = ~search & (action == A["rate"])
    value = np.where(rate, np.minimum(rng.choice(5, n, p=RATING_P) + 1.0, max_value), np.nan)
    surface = _choice(rng, SURFACE_P, n)
    imp = np.zeros((n, 0), np.int32)
    if g.impressions:  # in chunks: (n, k) temporaries of a big day would dominate memory
        imp = np.concatenate([catalog.impressions(rng, item[i:i + MATERIALIZE_ROWS], g.impressions)
                              for i in range(0, max(n, 1), MATERIALIZE_ROWS)])
    item = np.where(search & (action == A["none"]), -1, item)  # query and impressions stay: results shown

    late_s = np.zeros(s, dtype=bool)
    lag_s = np.zeros(s, dtype=np.int64)
    max_lag = min(late_days, n_days - 1 - day)
    if max_lag > 0:
        late_s = rng.random(s) < LATE_SESSION_SHARE
        lag_s = np.where(late_s, rng.integers(1, max_lag + 1, s), 0)
    late = late_s[sess]
    target = day + lag_s[sess]
    arrival = np.where(late, day_us + lag_s[sess] * DAY_US + rng.integers(0, DAY_US, n), ts)
    return {
        "num": first_num + np.arange(n), "user": user_s[sess], "ts": ts, "ts_null": np.zeros(n, bool),
        "item": item, "search": search, "action": action, "query": query, "value": value,
        "value_null": ~rate, "surface": surface, "imp": imp, "arrival": arrival, "target": target,
        "reason": np.full(n, -1, np.int8), "late": late, "dup": np.zeros(n, bool), "eid_null": np.zeros(n, bool),
    }


def plant_malformed(rng: np.random.Generator, ev: dict, idx: np.ndarray, day_us: int, late_days: int,
                    max_value: float, src_item: np.ndarray) -> None:
    """Give each row in idx exactly one defect, cycling through its table's codes."""
    search = ev["search"][idx]
    codes = np.empty(len(idx), np.int64)
    for is_search, table_codes in ((True, SEARCH_REASONS), (False, BROWSE_REASONS)):
        mask = search == is_search
        cycle = np.array([EVENT_REASONS.index(r) for r in table_codes])
        codes[mask] = cycle[np.arange(mask.sum()) % len(cycle)]
    ev["reason"][idx] = codes
    for code, reason in enumerate(EVENT_REASONS):
        rows = idx[codes == code]
        if len(rows):
            _defect(rng, ev, rows, reason, day_us, late_days, max_value, src_item)


def _defect(rng, ev: dict, rows: np.ndarray, reason: str, day_us: int, late_days: int, max_value: float,
            src_item: np.ndarray) -> None:
    m = len(rows)
    if reason == reasons.null(C.EVENT_ID):
        ev["eid_null"][rows] = True
    elif reason == reasons.null(C.USER_ID):
        ev["user"][rows] = -1
    elif reason == reasons.null(C.TS):
        ev["ts_null"][rows] = True
    elif reason == reasons.null(C.ITEM_ID):
        ev["item"][rows] = -1
    elif reason == reasons.null(C.QUERY):
        ev["query"][rows] = -1
    elif reason == reasons.EMPTY_QUERY:
        ev["query"][rows] = -2 - np.arange(m) % len(EMPTY_QUERIES)
    elif reason == reasons.TS_OUTSIDE_DAY:
        tod = ev["ts"][rows] - day_us
        after = np.arange(m) % 2 == 0  # half tomorrow or later, half before the late window
        days = np.where(after, 1 + rng.integers(0, 2, m), -(late_days + 1 + rng.integers(0, 3, m)))
        ev["ts"][rows] = day_us + days * DAY_US + tod
    elif reason == reasons.UNKNOWN_ACTION:
        bad = np.where(ev["search"][rows],
                       np.array([A[a] for a in SEARCH_BAD_ACTIONS])[np.arange(m) % len(SEARCH_BAD_ACTIONS)],
                       np.array([A[a] for a in BROWSE_BAD_ACTIONS])[np.arange(m) % len(BROWSE_BAD_ACTIONS)])
        ev["action"][rows] = bad
        ev["item"][rows] = src_item[rows]  # an unknown action on an item, not on nothing
    elif reason == reasons.UNKNOWN_ITEM:
        ev["item"][rows] = -2 - rng.integers(0, UNKNOWN_ITEM_POOL, m)
        none = ev["action"][rows] == A["none"]
        ev["action"][rows[none]] = A["click"]
    elif reason == reasons.BAD_VALUE:
        ev["action"][rows] = A["rate"]
        ev["value_null"][rows] = False
        kinds = np.array([np.nan, np.inf, -np.inf, -3.0, max_value * 10 + 1])
        ev["value"][rows] = kinds[np.arange(m) % len(kinds)]
    else:
        raise KeyError(reason)


def generate_day(rng: np.random.Generator, n: int, day: int, n_days: int, day_us: int, first_num: int,
                 catalog: Catalog, users: Users, g: GenerateConfig, late_days: int, max_value: float) -> dict:
    """Exactly n rows generated on this day: valid (some late), duplicates and malformed."""
    n_dup = round(n * DUPLICATE_SHARE)
    ev = day_events(rng, n - n_dup, day, n_days, day_us, first_num, catalog, users, g, late_days, max_value)
    if n_dup and ev["late"].all():
        ev["late"][:] = False  # a resend needs a row written today
        ev["target"][:] = day
        ev["arrival"] = ev["ts"].copy()
    own = np.flatnonzero(~ev["late"])
    n_bad = min(round(n * g.malformed_share), len(own) - (n_dup > 0))
    bad = rng.choice(own, n_bad, replace=False)
    src_item = np.where(ev["item"] >= 0, ev["item"], ev["query"] // N_QUERY_FORMS)
    plant_malformed(rng, ev, bad, day_us, late_days, max_value, src_item)
    is_bad = np.zeros(len(ev["num"]), dtype=bool)
    is_bad[bad] = True
    pool = own[~is_bad[own]]
    dup_of = np.sort(rng.choice(pool, n_dup, replace=n_dup > len(pool)))
    dups = _take(ev, dup_of)
    dups["dup"][:] = True
    return _concat([ev, dups])


# --- materialization --------------------------------------------------------------------------
def _codes_lookup(base: pa.Array, extra: pa.Array, codes: np.ndarray) -> pa.Array:
    """base[code] for code >= 0, extra[-1 - code] for negative codes."""
    idx = np.where(codes >= 0, codes, len(base) - 1 - codes)
    return pa.concat_arrays([base, extra]).take(pa.array(idx))


def _event_chunk(ev: dict, table: str, catalog: Catalog, users: Users, item_extra: pa.Array,
                 query_extra: pa.Array, actions: pa.Array) -> pa.Table:
    n = len(ev["num"])
    eid = pc.if_else(pa.array(ev["eid_null"]), pa.scalar(None, pa.string()), _ids("e", ev["num"]))
    user = users.ids.take(pa.array(np.where(ev["user"] >= 0, ev["user"], len(users.ids) - 1)))
    ts = pa.array(ev["ts"], TS_TYPE, mask=ev["ts_null"])
    item = _codes_lookup(catalog.item_ids, item_extra, ev["item"])
    action = actions.take(pa.array(ev["action"]))
    k = ev["imp"].shape[1]
    if k:
        imp = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                       catalog.item_ids.take(pa.array(ev["imp"].ravel())))
    else:
        imp = pa.nulls(n, pa.list_(pa.string()))
    if table == "search_events":
        query = _codes_lookup(catalog.queries, query_extra, ev["query"])
        return pa.Table.from_arrays([eid, user, ts, query, item, action, imp], schema=SEARCH_EVENTS)
    value = pa.array(ev["value"], pa.float64(), mask=ev["value_null"])
    surface = pa.array(SURFACES).take(pa.array(ev["surface"]))
    return pa.Table.from_arrays([eid, user, ts, item, action, value, surface, imp], schema=BROWSE_EVENTS)


def event_table(ev: dict, table: str, catalog: Catalog, users: Users) -> pa.Table:
    # null first, then unknown ids -2, -3... as extra[1], extra[2]...
    item_extra = pa.concat_arrays([pa.nulls(1, pa.string()),
                                   _ids("i", UNKNOWN_ITEM_BASE + np.arange(UNKNOWN_ITEM_POOL))])
    query_extra = pa.array([None, *EMPTY_QUERIES], pa.string())
    actions = pa.array(ACTIONS)
    n = len(ev["num"])
    chunks = [
        _event_chunk(_take(ev, slice(i, i + MATERIALIZE_ROWS)), table, catalog, users, item_extra,
                     query_extra, actions)
        for i in range(0, n, MATERIALIZE_ROWS)
    ]
    if not chunks:
        return (SEARCH_EVENTS if table == "search_events" else BROWSE_EVENTS).empty_table()
    return pa.concat_tables(chunks)


def event_truth(ev: dict, table_codes: tuple[str, ...]) -> dict:
    counts = np.bincount(ev["reason"][ev["reason"] >= 0], minlength=len(EVENT_REASONS))
    return {
        "rows": len(ev["num"]),
        "malformed": {r: int(counts[EVENT_REASONS.index(r)]) for r in table_codes},
        "late": int(ev["late"].sum()),
        "duplicates": int(ev["dup"].sum()),
    }


# --- the job ----------------------------------------------------------------------------------
def _day_counts(total: int, days: int) -> list[int]:
    base, extra = divmod(total, days)
    return [base + (d < extra) for d in range(days)]


def run(cfg: Config, start_ds: str, out_root: str | Path | None = None) -> dict:
    """Write cfg.generate.days days of raw logs from start_ds; return the ground truth per table and day."""
    t0 = time.perf_counter()
    g = cfg.generate
    root = Path(out_root) if out_root is not None else Path(cfg.lake.root)
    late_days, max_value = cfg.validation.late_days, cfg.validation.max_value
    start = parse_ds(start_ds)
    days = [(start + dt.timedelta(days=d)).isoformat() for d in range(g.days)]
    epoch_us = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.timezone.utc).timestamp()) * S_US

    rng = np.random.default_rng([g.seed, 0])
    catalog = Catalog(rng, g.categories)
    final_items = g.items + (g.days - 1) * round(g.items * g.new_item_share_per_day)
    junk_next = final_items  # null-title rows take ids above every real item
    pending: dict[int, list[dict]] = {}
    truth: dict[str, dict] = {"catalog": {}, "search_events": {}, "browse_events": {}}
    users = None
    first_num = 0
    for d, (ds, n) in enumerate(zip(days, _day_counts(g.events, g.days))):
        day_rng = np.random.default_rng([g.seed, 1, d])
        cat_table, truth["catalog"][ds] = catalog_day(day_rng, catalog, g, d, junk_next)
        junk_next += truth["catalog"][ds]["malformed"][reasons.null(C.TITLE)]
        lake.write_partition(cat_table, lake.partition(root, "raw/catalog", ds))
        if users is None:
            users = Users(rng, g.users, catalog)
        elif d:
            users.drift(day_rng, g.interest_drift_per_day, catalog)

        day_us = epoch_us + d * DAY_US
        ev = generate_day(day_rng, n, d, g.days, day_us, first_num, catalog, users, g, late_days, max_value)
        first_num += n
        for t in np.unique(ev["target"][ev["target"] > d]):
            pending.setdefault(int(t), []).append(_take(ev, ev["target"] == t))
        today = ev["target"] == d
        ev = _concat([ev if today.all() else _take(ev, today), *pending.pop(d, [])])
        order = np.argsort(ev["arrival"], kind="stable")  # log order: as rows arrived
        for table, is_search, codes in (("search_events", True, SEARCH_REASONS),
                                        ("browse_events", False, BROWSE_REASONS)):
            part = _take(ev, order[ev["search"][order] == is_search])
            lake.write_partition(event_table(part, table, catalog, users), lake.partition(root, f"raw/{table}", ds))
            truth[table][ds] = event_truth(part, codes)
        del ev, part, order

    seconds = time.perf_counter() - t0
    return {
        "root": str(root),
        "raw": str(root / "raw"),
        "seed": g.seed,
        "days": days,
        "events": int(sum(truth[t][ds]["rows"] for t in ("search_events", "browse_events") for ds in days)),
        "items": catalog.n,
        "seconds": round(seconds, 2),
        "events_per_s": round(g.events / seconds) if seconds else None,
        "tables": truth,
    }
