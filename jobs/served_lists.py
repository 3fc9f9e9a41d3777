"""What is served, measured: day D-1's published candidate lists against day D's engagements.

The lists published for D-1 (``cfg.layout.candidates_part(D-1)``, scored at the end of D-1) are what users
saw on D. ``run`` measures them on the engagements of D, per surface, so the figure users see is a figure
the evaluation reports, beside the offline figures of ``jobs.evaluate`` (under ``"served"`` in the day's
``evaluation.json``; the evaluate stage's MLflow run logs them as ``served.<surface>.<name>``).

Definitions (all computed on Spark with joins and aggregations; only one row per surface is collected):

* An engagement of D: an event of the sessionized ``events`` partition of D with an item and a positive
  action (``schemas.raw.ENGAGEMENT_ACTIONS``: every action but a search's ``none``), whose own time is
  on D (UTC). A late event of D-1 that arrived on D happened before the lists were served and is left
  out; an event of D that arrives on D+1 is not yet known when D is evaluated.
* A surface's engagements are those of its own events, as the offline tasks (``jobs.splits``): a browse
  engagement is a ``rec`` one (the request is the user), a search engagement a ``search`` one (the
  request is (user, the query normalized as the lists' queries are)). A request's relevant items are the
  distinct items engaged for it on D; relevance is binary.
* ``requests``: lists published for D-1; ``with_engagement``: those whose request had an engagement on D
  (the figures below are means over these); ``engaged_requests``: requests with an engagement on D,
  listed or not; ``coverage`` = with_engagement / engaged_requests, the share of D's engaged requests a
  list was served for (new users and new queries have none); ``engaged_share`` = with_engagement /
  requests.
* ``recall@K``: |engaged items in the top K| / |engaged items|, the standard IR recall, per request;
  ``hit_rate@K``: the share of requests with at least one engaged item in the top K. With one engaged
  item both are ``synergen_core.metrics``' Recall@K (which has one relevant item per request).
* ``ndcg@K``: DCG over the top K (1 / log2(rank + 1) per engaged item) over the ideal DCG of
  min(|engaged items|, K) items at the top. Served ranks are explicit (no ties to break).

The first day (no lists published for D-1) gives ``{"available": false, "why": ...}``, not an error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from schemas import C
from schemas.candidates import SURFACE_REC, SURFACE_SEARCH
from schemas.raw import ENGAGEMENT_ACTIONS
from schemas.sequences import EVENTS, KIND_SEARCH
from synergen_core import lake
from synergen_core.config import Config, parse_ds

KEY = [C.SURFACE, C.USER_ID, "_query"]  # a request; "_query" is the query, "" on rec (joins need no nulls)
COUNTS = ("requests", "with_engagement", "engaged_requests")


def lists_day(ds: str) -> str:
    """The day whose lists served ``ds``."""
    return lake.previous_day(parse_ds(ds).isoformat())


def published(cfg: Config, ds: str) -> bool:
    """Whether lists were published for day ``ds`` (the day's ``_SUCCESS``)."""
    return (cfg.layout.candidates_part(ds) / lake.SUCCESS).is_file()


def unavailable(cfg: Config, ds: str) -> dict | None:
    """The result when there is nothing to measure on ``ds`` (no lists of D-1, or no events of D), else None."""
    ds = parse_ds(ds).isoformat()
    before, events = lists_day(ds), cfg.layout.sessions("events")
    base = {"ds": ds, "lists_ds": before, "available": False}
    if not published(cfg, before):
        return {**base, "why": f"no lists published for {before} ({cfg.layout.candidates_part(before)}): "
                               "nothing was served on the day"}
    if ds not in cfg.layout.days(events):
        return {**base, "why": f"no sessionized events of {ds} ({cfg.layout.part(events, ds)})"}
    return None


def evaluate(cfg: Config, ds: str) -> dict:
    """``run`` in a Spark session from ``cfg`` (opened only when there is something to measure)."""
    from jobs.spark import session

    nothing = unavailable(cfg, ds)
    if nothing is not None:
        return nothing
    with session(cfg) as spark:
        return run(spark, cfg, ds)


def run(spark, cfg: Config, ds: str) -> dict:
    """{"ds", "lists_ds", "available", "ks", "model", "surfaces": {surface: figures}}: see the module doc."""
    from jobs.candidates import SCORE_FILE, read_lists
    from jobs.spark import spark_partition

    nothing = unavailable(cfg, ds)
    if nothing is not None:
        return nothing
    ds = parse_ds(ds).isoformat()
    before, ks = lists_day(ds), sorted(cfg.evaluate.ks)
    part = cfg.layout.candidates_part(before)
    lists = read_lists(spark, part)
    events = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("events"), ds, EVENTS)
    # one aggregate row per surface (two at most), whatever the number of users, lists or events
    rows = {r[C.SURFACE]: r.asDict() for r in figures(requests_frame(lists, engagements(events, ds)), ks).collect()}
    surfaces = [s for s in (SURFACE_REC, SURFACE_SEARCH) if s in cfg.score.surfaces or s in rows]
    return {"ds": ds, "lists_ds": before, "available": True, "ks": ks, "model": _model(part / SCORE_FILE),
            "surfaces": {s: _surface_figures(rows.get(s), ks) for s in surfaces}}


def _model(score_file: Path) -> dict | None:
    """The model that scored the lists, from the day's ``_score.json``."""
    return json.loads(score_file.read_text()).get("model") if score_file.is_file() else None


def engagements(events, ds: str):
    """Distinct (surface, user_id, _query, item_id) engaged on ``ds``: see the module doc."""
    from pyspark.sql import functions as F

    from jobs.sessionize import normalize_query

    search = F.col(C.KIND) == KIND_SEARCH
    start, end = (F.to_timestamp(F.lit(d)) for d in (ds, lake.next_day(ds)))
    positive = (F.col(C.ITEM_ID).isNotNull() & F.col(C.ACTION).isin(*ENGAGEMENT_ACTIONS)
                & (F.col(C.TS) >= start) & (F.col(C.TS) < end) & (~search | F.col(C.QUERY).isNotNull()))
    return events.where(positive).select(
        F.when(search, SURFACE_SEARCH).otherwise(SURFACE_REC).alias(C.SURFACE), C.USER_ID,
        F.when(search, normalize_query(F.col(C.QUERY))).otherwise("").alias("_query"), C.ITEM_ID).distinct()


def requests_frame(lists, engaged):
    """One row per request listed or engaged: ``_listed``, ``_n_rel`` (engaged items), ``_ranks`` (the
    list ranks of its engaged items; empty when none was listed)."""
    from pyspark.sql import functions as F

    lists = lists.withColumn("_query", F.coalesce(F.col(C.QUERY), F.lit("")))
    listed = lists.select(*KEY).distinct().withColumn("_listed", F.lit(True))
    relevant = engaged.groupBy(*KEY).agg(F.count("*").cast("int").alias("_n_rel"))
    hits = (lists.join(engaged, KEY + [C.ITEM_ID]).groupBy(*KEY)
            .agg(F.collect_list(C.RANK).alias("_ranks")))  # at most a list's length per request
    return (listed.join(relevant, KEY, "full").join(hits, KEY, "left")
            .select(*KEY, F.coalesce("_listed", F.lit(False)).alias("_listed"),
                    F.coalesce("_n_rel", F.lit(0)).alias("_n_rel"),
                    F.coalesce("_ranks", F.array().cast("array<int>")).alias("_ranks")))


def figures(requests, ks: list[int]):
    """Per surface: the counts and, over the listed requests with an engagement, the mean Recall@K,
    hit rate@K and NDCG@K (null when there is none)."""
    from pyspark.sql import functions as F

    listed, engaged = F.col("_listed"), F.col("_n_rel") > 0
    ideal = [sum(1 / math.log2(r + 2) for r in range(m)) for m in range(max(ks) + 1)]  # m engaged items on top
    aggs = [F.sum(listed.cast("long")).alias("requests"),
            F.sum((listed & engaged).cast("long")).alias("with_engagement"),
            F.sum(engaged.cast("long")).alias("engaged_requests")]
    for k in ks:
        top = F.filter("_ranks", lambda r: r <= k)
        dcg = F.aggregate(top, F.lit(0.0), lambda acc, r: acc + 1.0 / F.log2(r + 1))
        idcg = F.element_at(F.array(*[F.lit(float(x)) for x in ideal[1:k + 1]]), F.least("_n_rel", F.lit(k)))
        scored = listed & engaged  # avg skips the nulls of the other rows
        aggs += [F.avg(F.when(scored, F.size(top) / F.col("_n_rel"))).alias(f"recall@{k}"),
                 F.avg(F.when(scored, (F.size(top) > 0).cast("double"))).alias(f"hit_rate@{k}"),
                 F.avg(F.when(scored, dcg / idcg)).alias(f"ndcg@{k}")]
    return requests.groupBy(C.SURFACE).agg(*aggs)


def _surface_figures(row: dict | None, ks: list[int]) -> dict:
    """One surface's collected row as the result's figures (zeros for a surface without any row)."""
    row = row or {}
    out = {name: int(row.get(name) or 0) for name in COUNTS}
    out["coverage"] = out["with_engagement"] / out["engaged_requests"] if out["engaged_requests"] else None
    out["engaged_share"] = out["with_engagement"] / out["requests"] if out["requests"] else None
    for k in ks:
        for name in (f"recall@{k}", f"hit_rate@{k}", f"ndcg@{k}"):
            out[name] = float(row[name]) if row.get(name) is not None else None
    return out


def metrics(served: dict | None) -> dict[str, float]:
    """MLflow metrics of a ``run`` result: ``served.<surface>.<name>`` (``@`` as ``_at_``), the figures
    that are set; ``served.available`` 0 or 1."""
    if not served:
        return {}
    out = {"served.available": float(bool(served.get("available")))}
    for surface, figs in (served.get("surfaces") or {}).items():
        out.update({f"served.{surface}.{name.replace('@', '_at_')}": float(v)
                    for name, v in figs.items() if v is not None})
    return out


def evaluate_stage(cfg: Config, ds: str, **kw) -> dict:
    """The evaluate stage's body: ``jobs.evaluate.run`` (the models, the registry's champion and the
    baselines offline), then the lists
    served on ``ds`` (``evaluate``) under ``"served"`` of the same result and ``evaluation.json``."""
    from jobs import evaluate as offline
    from synergen_core import checkpoint

    out = offline.run(cfg, ds, champion=True, **kw)
    out["served"] = evaluate(cfg, ds)
    checkpoint.save_json(out, offline.result_path(cfg, ds))
    return out


def summary_lines(served: dict | None, k: int = 10) -> list[str]:
    """``synergen run``'s lines on the served lists: one per surface, or why there is no figure."""
    if served is None:
        return []
    if not served.get("available"):
        return [f"served lists of {served.get('lists_ds')} on {served.get('ds')}: no figure ({served.get('why')})"]
    lines = [f"served lists of {served['lists_ds']} on the engagements of {served['ds']}: NDCG@{k} / Recall@{k}"]
    for surface, f in served["surfaces"].items():
        cell = (f"{f[f'ndcg@{k}']:.4f} / {f[f'recall@{k}']:.4f}" if f.get(f"ndcg@{k}") is not None else "-")
        cover = f"{f['coverage']:.1%}" if f["coverage"] is not None else "-"
        lines.append(f"  {surface:<8}{cell:>18}  over {f['with_engagement']:,} of {f['requests']:,} lists "
                     f"with an engagement; coverage {cover} of {f['engaged_requests']:,} engaged requests")
    return lines
