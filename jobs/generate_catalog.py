"""The synthetic catalog of ``jobs.generate``: items with 2-level categories, brands and templated titles
(from the word tables below), new items every day and a few changed descriptions, Zipf-like popularity,
and the samplers the events draw items, categories and impressions from. ``catalog_day`` grows it by one
day and returns that day's ``raw/catalog`` partition with its planted malformed rows and ground truth.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import C, reasons
from schemas.raw import CATALOG
from synergen_core.config import GenerateConfig

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
BRAND_SPREAD = 6  # brands specialise: each top category draws from a few neighbouring brands
POSITION_BIAS = 0.35  # the engaged item's position in impressions: geometric, top-heavy
CHANGED_ITEM_SHARE_PER_DAY = 0.005  # catalog rows whose description changes on a day
N_QUERY_FORMS = 4  # per item: leaf, brand + leaf, adjective + leaf, top category + leaf
CATALOG_REASONS = (reasons.DUPLICATE_ITEM_ID, reasons.null(C.TITLE))


# --- small helpers ----------------------------------------------------------------------------
def prefixed_ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers, pa.int64()), pa.string()), "")


def zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Weights rank^-exponent over a random permutation of n things."""
    return (rng.permutation(n) + 1.0) ** -exponent


def weighted_draw(rng: np.random.Generator, cumulative: np.ndarray, m: int) -> np.ndarray:
    """m indices drawn proportionally to the weights whose cumulative sum is given."""
    u = rng.random(m) * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1)


def _join(*parts, sep: str = " ") -> pa.Array:
    return pc.binary_join_element_wise(*parts, sep)


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
        self.cat_weight = zipf_weights(rng, n_categories, CATEGORY_ZIPF)
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
                                  weighted_draw(rng, np.cumsum(self.cat_weight), m - k)])
            weight = zipf_weights(rng, m, ITEM_ZIPF)
            self.n_initial = m
        else:
            cat = weighted_draw(rng, np.cumsum(self.cat_weight), m)
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
        self.item_ids = prefixed_ids("i", np.arange(self.n))

    def sample_categories(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return weighted_draw(rng, self.cat_cum, m)

    def sample_items(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return self.order[weighted_draw(rng, self.cum, m)]

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
    junk = catalog.rows(None, attrs=junk_attrs, ids=prefixed_ids("i", junk_base + np.arange(n_null)), null_title=True)
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
