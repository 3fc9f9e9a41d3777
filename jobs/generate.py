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

The catalog (word tables, items, samplers, a day's catalog partition) is ``jobs/generate_catalog.py``.
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.generate_catalog import N_QUERY_FORMS, Catalog, catalog_day, prefixed_ids, weighted_draw, zipf_weights
from schemas import C, reasons
from schemas.raw import BROWSE_ACTIONS, BROWSE_EVENTS, SEARCH_ACTIONS, SEARCH_EVENTS, TS_TYPE
from synergen_core import lake
from synergen_core.config import Config, GenerateConfig, parse_ds

DAY_US = 86_400_000_000
S_US = 1_000_000


# --- behaviour (why these numbers: they give the shapes real logs have, at any scale) ----------
USER_ZIPF = 0.5  # milder: heavy users exist but do not own the log
SESSION_MEAN_EVENTS = 5
GAP_MIN_S, GAP_MEAN_S = 2.0, 40.0  # within a session: seconds to minutes
# A user's sessions fall in distinct hourly slots, stride 5 h apart: a session starts in the first
# 12 minutes of its slot and lasts at most 16, so sessions of one user are >30 minutes apart.
SLOTS, SLOT_STRIDE = 24, 5
SESSION_START_WINDOW_S, SESSION_MAX_S = 12 * 60, 16 * 60
PREFERRED_SESSION_SHARE = 0.7  # sessions about the user's preferred category (else a popular one)
SESSION_FOCUS = 0.85  # events of a session within its category (else anything popular)
REPEAT_SHARE = 0.25  # events that come back to the session's previous item (view, then cart...)
LATE_SESSION_SHARE = 0.02  # whole sessions uploaded up to late_days days later
DUPLICATE_SHARE = 0.003  # exact resends of a row (same event id)
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

SEARCH_REASONS = (
    reasons.null(C.EVENT_ID), reasons.null(C.USER_ID), reasons.null(C.TS), reasons.null(C.QUERY),
    reasons.TS_OUTSIDE_DAY, reasons.UNKNOWN_ACTION, reasons.EMPTY_QUERY, reasons.UNKNOWN_ITEM,
)
BROWSE_REASONS = (
    reasons.null(C.EVENT_ID), reasons.null(C.USER_ID), reasons.null(C.TS), reasons.null(C.ITEM_ID),
    reasons.TS_OUTSIDE_DAY, reasons.UNKNOWN_ACTION, reasons.UNKNOWN_ITEM, reasons.BAD_VALUE,
)
EVENT_REASONS = tuple(dict.fromkeys(SEARCH_REASONS + BROWSE_REASONS))  # index = code in the "reason" array

MATERIALIZE_ROWS = 1 << 20  # rows per Arrow chunk: bounds temporaries and string offsets


# --- small helpers ----------------------------------------------------------------------------






def _choice(rng: np.random.Generator, probs: dict[str, float], m: int, codes: dict[str, int] | None = None):
    keys = list(probs)
    p = np.array([probs[k] for k in keys])
    picked = rng.choice(len(keys), size=m, p=p / p.sum())
    lookup = np.array([codes[k] for k in keys] if codes else range(len(keys)), dtype=np.int16)
    return lookup[picked]




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










# --- users ------------------------------------------------------------------------------------
class Users:
    def __init__(self, rng: np.random.Generator, n: int, catalog: Catalog):
        self.cum = np.cumsum(zipf_weights(rng, n, USER_ZIPF))
        self.phase = rng.integers(0, SLOTS, n)  # the hour a user is usually active
        self.pref = catalog.sample_categories(rng, n)
        self.ids = pa.concat_arrays([prefixed_ids("u", np.arange(n)), pa.nulls(1, pa.string())])

    def drift(self, rng: np.random.Generator, share: float, catalog: Catalog) -> None:
        moved = np.flatnonzero(rng.random(len(self.pref)) < share)
        self.pref[moved] = catalog.sample_categories(rng, len(moved))

    def sample(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return weighted_draw(rng, self.cum, m)


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
    eid = pc.if_else(pa.array(ev["eid_null"]), pa.scalar(None, pa.string()), prefixed_ids("e", ev["num"]))
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
                                   prefixed_ids("i", UNKNOWN_ITEM_BASE + np.arange(UNKNOWN_ITEM_POOL))])
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
    layout = lake.Layout(root)
    for d, (ds, n) in enumerate(zip(days, _day_counts(g.events, g.days))):
        day_rng = np.random.default_rng([g.seed, 1, d])
        cat_table, truth["catalog"][ds] = catalog_day(day_rng, catalog, g, d, junk_next)
        junk_next += truth["catalog"][ds]["malformed"][reasons.null(C.TITLE)]
        lake.write_partition(cat_table, layout.part(layout.raw("catalog"), ds))
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
            lake.write_partition(event_table(part, table, catalog, users), layout.part(layout.raw(table), ds))
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
