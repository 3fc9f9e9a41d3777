"""What ``synergen run`` prints at the end: a short human summary read from the run's own outputs (the
day's validation reports, its evaluation, the registry), with the JSON in a file beside it."""
import json

from jobs import pipeline
from synergen_core.config import Config


def test_summary_names_counts_scorers_registry_and_where_things_are(tmp_path):
    cfg = Config()
    cfg.lake.root = tmp_path / "lake"
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.mlflow.artifact_root = tmp_path / "mlartifacts"
    ds = "2026-01-03"
    report = cfg.lake.root / "validated" / "browse_events" / f"ds={ds}"
    report.mkdir(parents=True)
    (report / "_validation.json").write_text(json.dumps(
        {"rows_in": 1200, "rows_valid": 1188, "rows_quarantined": 12, "reasons": {"ts_out_of_day": 9, "null:user_id": 3}}))
    evaluation = cfg.lake.root / cfg.train.output / f"ds={ds}"
    evaluation.mkdir(parents=True)
    scorer = lambda n, r: {"catalog": {"rec": {"ndcg@10": n, "recall@10": r}}}  # noqa: E731
    (evaluation / "evaluation.json").write_text(json.dumps({"ds": ds, "temporal": {
        "test_targets": {"search": 0, "rec": 321},
        "scorers": {"synergen": scorer(0.1234, 0.2345), "popularity": scorer(0.0111, 0.0222)}}}))
    result = {"dag_run": {"ds": ds}, "seconds": 61.2,
              "outputs": {"candidates": "/lake/candidates/ds=2026-01-03", "quarantine": "/lake/quarantine"},
              "next": {"mlflow_ui": "make mlflow"}, "summary_file": "/var/synergen-run.json"}

    text = pipeline.summary(cfg, result)

    assert "browse_events" in text and "1,200 -> 1,188 + 12" in text and "ts_out_of_day 9" in text
    assert "search_events" not in text  # no report for it: not listed rather than shown as zeros
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "0.1234 / 0.2345" in rows["synergen"] and "0.0111 / 0.0222" in rows["popularity"]
    assert "rec 321" in text and "search" not in text.split("evaluation")[1].splitlines()[0]
    assert "no champion" in text
    assert "/lake/candidates/ds=2026-01-03" in text and "make mlflow" in text and "/var/synergen-run.json" in text
    assert not text.lstrip().startswith("{")  # a summary, not the JSON blob


def test_summary_shows_both_orders_of_the_ranking_stage_and_the_one_served(tmp_path):
    """Issue 27: per model with a ranking head, its test lists by the head and by retrieval, and which is served."""
    path = tmp_path / "evaluation.json"
    lists = lambda s, r: {"search": {"auc": s, "ndcg@10": s / 2}, "rec": {"auc": r, "ndcg@10": r / 2}}  # noqa: E731
    path.write_text(json.dumps({"ds": "2026-01-03", "temporal": {
        "test_targets": {"search": 5, "rec": 7},
        "scorers": {"synergen": {"catalog": {}, "ranking": lists(0.649, 0.651),
                                 "ranking_retrieval": lists(0.976, 0.859),
                                 "served_order": {"search": "retrieval", "rec": "retrieval"}},
                    "popularity": {"catalog": {}, "ranking": lists(0.5, 0.5)}}}}))

    lines = pipeline._evaluation_lines(path)

    rows = {line[4:18].strip(): line[18:] for line in lines if line.startswith("    ")}
    assert rows["by head"].split() == ["0.6490", "/", "0.3245", "0.6510", "/", "0.3255"]  # search, rec
    assert rows["by retrieval"].split() == ["0.9760", "/", "0.4880", "0.8590", "/", "0.4295"]
    assert rows["served"].split() == ["retrieval", "retrieval"]
    assert sum("ranking stage of" in line for line in lines) == 1  # popularity has no head
