"""The served lists measured (issue 27): day D-1's published candidate lists against day D's engagements, on
local Spark over a tiny hand-made lake, with figures computed by hand; the evaluate stage's result, its
MLflow run and ``synergen run``'s summary show them."""
import datetime as dt
import json
import math
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import pipeline, served_lists, stages
from schemas import C
from schemas.candidates import CANDIDATES
from schemas.sequences import EVENTS
from synergen_core import lake, tracking
from synergen_core.config import Config

from conftest import spark_test_config

BEFORE, DS = "2026-03-01", "2026-03-02"
INV3 = 1 / math.log2(3)  # the discount of rank 2 (and of the second ideal item)


def _lists(root: Path, cfg: Config, rows: dict[str, list[tuple]]) -> None:
    """Published lists of BEFORE: surface -> [(user, query, [items in rank order])]."""
    part = cfg.layout.candidates_part(BEFORE)
    for surface, requests in rows.items():
        out = [dict(user_id=u, query=q, rank=r, item_id=i, retrieval_score=-float(r), ranking_score=-float(r),
                    model_name="synergen", model_version="3")
               for u, q, items in requests for r, i in enumerate(items, 1)]
        (part / f"surface={surface}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(out, CANDIDATES), part / f"surface={surface}" / "part-0.parquet")
    (part / "_score.json").write_text(json.dumps({"model": {"name": "synergen", "version": "3"}}))
    (part / lake.SUCCESS).touch()


def _events(cfg: Config, rows: list[tuple]) -> None:
    """Sessionized events of DS: (user, kind, typed query, item, action, hour; negative = the day before)."""
    t0 = dt.datetime.fromisoformat(DS).replace(tzinfo=dt.timezone.utc)
    out = [{**{f.name: None for f in EVENTS}, C.EVENT_ID: f"e{n}", C.USER_ID: u, C.KIND: kind, C.QUERY: q,
            C.ITEM_ID: item, C.ACTION: action, C.TS: t0 + dt.timedelta(hours=h)}
           for n, (u, kind, q, item, action, h) in enumerate(rows)]
    part = cfg.layout.part(cfg.layout.sessions("events"), DS)
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(out, EVENTS), part / "part-0.parquet")
    (part / lake.SUCCESS).touch()


@pytest.fixture
def cfg(tmp_path):
    cfg = spark_test_config(Config())
    cfg.lake.root = tmp_path / "lake"
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.mlflow.artifact_root = tmp_path / "mlartifacts"
    cfg.evaluate = cfg.evaluate.model_copy(update={"ks": [1, 3]})
    return cfg


@pytest.fixture
def lake_of_two_days(cfg):
    _lists(cfg.lake.root, cfg, {
        "rec": [("u1", None, ["a", "b", "c"]), ("u2", None, ["a", "b", "c"]), ("u3", None, ["a", "b", "c"])],
        "search": [("u1", "red shoes", ["s1", "s2", "s3"]), ("u2", "blue hat", ["h1", "h2", "h3"])]})
    _events(cfg, [
        ("u1", "browse", None, "b", "click", 1), ("u1", "browse", None, "d", "view", 2),
        ("u1", "browse", None, "b", "purchase", 3),  # b again: one engaged item
        ("u2", "browse", None, "a", "purchase", 1),
        ("u2", "search", "green", "c", "click", 2),  # a search engagement: not one of the rec list's
        ("u3", "browse", None, "a", "view", -2),  # late: happened on the day before, before the lists served
        ("u4", "browse", None, "x", "view", 5),  # engaged, but no list was served to u4
        ("u1", "search", "Red  Shoes ", "s3", "click", 4),  # normalized as the lists' query
        ("u1", "search", "red shoes", "s9", "add_to_cart", 5),
        ("u1", "browse", None, "s1", "view", 6),  # a rec engagement of u1, not one of the search list's
        ("u2", "search", "blue hat", None, "none", 7),  # searched, engaged nothing
        ("u2", "search", "green", "g1", "click", 8),  # engaged, no list for the query
    ])
    return cfg


def test_served_lists_figures_computed_by_hand(spark, lake_of_two_days):
    out = served_lists.run(spark, lake_of_two_days, DS)

    assert out["available"] and out["lists_ds"] == BEFORE and out["ks"] == [1, 3]
    assert out["model"] == {"name": "synergen", "version": "3"}
    rec, search = out["surfaces"]["rec"], out["surfaces"]["search"]
    # rec: u1 engaged {b, d, s1} (b at rank 2), u2 {a} (rank 1), u3 nothing on the day, u4 without a list
    assert {k: rec[k] for k in ("requests", "with_engagement", "engaged_requests")} == {
        "requests": 3, "with_engagement": 2, "engaged_requests": 3}
    assert rec["coverage"] == pytest.approx(2 / 3) and rec["engaged_share"] == pytest.approx(2 / 3)
    assert rec["recall@1"] == pytest.approx((0 + 1) / 2) and rec["recall@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert rec["hit_rate@1"] == pytest.approx(0.5) and rec["hit_rate@3"] == pytest.approx(1.0)
    assert rec["ndcg@1"] == pytest.approx(0.5) and rec["ndcg@3"] == pytest.approx((INV3 / (1 + INV3 + 0.5) + 1) / 2)
    # search: (u1, red shoes) engaged {s3, s9} (s3 at rank 3); (u2, blue hat) nothing; (u2, green) no list
    assert {k: search[k] for k in ("requests", "with_engagement", "engaged_requests")} == {
        "requests": 2, "with_engagement": 1, "engaged_requests": 2}
    assert search["coverage"] == pytest.approx(0.5)
    assert search["recall@1"] == 0 and search["recall@3"] == pytest.approx(0.5)
    assert search["hit_rate@1"] == 0 and search["hit_rate@3"] == 1
    assert search["ndcg@1"] == 0 and search["ndcg@3"] == pytest.approx(0.5 / (1 + INV3))


def test_lists_without_any_engagement_count_but_have_no_figure(spark, cfg):
    _lists(cfg.lake.root, cfg, {"rec": [("u1", None, ["a", "b"])], "search": []})
    _events(cfg, [("u1", "search", "hat", None, "none", 1), ("u9", "browse", None, "a", "view", 2)])

    out = served_lists.run(spark, cfg, DS)

    rec = out["surfaces"]["rec"]
    assert (rec["requests"], rec["with_engagement"], rec["engaged_requests"]) == (1, 0, 1)
    assert rec["coverage"] == 0 and rec["engaged_share"] == 0
    assert rec["recall@3"] is None and rec["ndcg@3"] is None
    assert out["surfaces"]["search"]["requests"] == 0 and out["surfaces"]["search"]["coverage"] is None
    assert served_lists.metrics(out) == {
        "served.available": 1.0, "served.rec.requests": 1.0, "served.rec.with_engagement": 0.0,
        "served.rec.engaged_requests": 1.0, "served.rec.coverage": 0.0, "served.rec.engaged_share": 0.0,
        "served.search.requests": 0.0, "served.search.with_engagement": 0.0,
        "served.search.engaged_requests": 0.0}


def test_first_day_says_no_lists_were_served(cfg):
    _events(cfg, [("u1", "browse", None, "a", "view", 1)])
    out = served_lists.evaluate(cfg, DS)  # no Spark needed: nothing to read
    assert out["available"] is False and out["lists_ds"] == BEFORE and "no lists published" in out["why"]
    # an unpublished day (no _SUCCESS: scored, never validated and published) is not served either
    cfg.layout.candidates_part(BEFORE).mkdir(parents=True)
    assert served_lists.evaluate(cfg, DS)["available"] is False
    assert served_lists.metrics(out) == {"served.available": 0.0}
    line, = served_lists.summary_lines(out)
    assert "no figure" in line and "no lists published" in line


def test_evaluate_stage_writes_and_logs_the_served_figures(spark, lake_of_two_days, monkeypatch):
    """The evaluate stage (its offline part stubbed: no trained model here) writes the served figures into
    evaluation.json and logs them in its MLflow run; the run summary shows them."""
    from jobs import evaluate

    cfg = lake_of_two_days

    def offline(cfg, ds, **kw):
        evaluate.result_path(cfg, ds).parent.mkdir(parents=True, exist_ok=True)
        return {"ds": ds}

    monkeypatch.setattr(evaluate, "run", offline)
    out = stages.evaluate(cfg, DS)

    saved = json.loads(evaluate.result_path(cfg, DS).read_text())
    assert saved["served"] == out["served"] and saved["served"]["surfaces"]["rec"]["with_engagement"] == 2
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.search_runs([tracking.experiment_id(cfg)], filter_string="tags.`synergen.stage` = 'evaluate'")[0]
    assert run.data.metrics["served.rec.recall_at_3"] == pytest.approx(2 / 3)
    assert run.data.metrics["served.search.ndcg_at_3"] == pytest.approx(0.5 / (1 + INV3))
    assert run.data.metrics["served.rec.requests"] == 3

    lines = pipeline._evaluation_lines(evaluate.result_path(cfg, DS), k=3)
    assert lines[1].startswith(f"served lists of {BEFORE} on the engagements of {DS}")
    assert any(line.split()[0] == "rec" and "0.6667" in line and "coverage 66.7%" in line for line in lines)
