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
