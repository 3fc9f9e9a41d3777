"""benchmarks.quality --add: a dataset's table run in parts stays one table of same-settings runs."""
import pytest

import numpy as np

from benchmarks.quality import PAIRED_K, added, aggregate, paired, refuse_addition, table


def scorer(r10: float, seconds: float | None = 100.0) -> dict:
    catalog = {"rec": {f"{m}@{k}": r10 for k in (5, 10, 20, 50) for m in ("recall", "ndcg")}}
    return {"catalog": catalog, "ranking": {"rec": {"auc": 0.7}}, "catalog_consumed_kept": catalog,
            "train_seconds": seconds, "epochs_run": 3}


def figure(variants: list[str], r10: list[float], overrides: list[str], command: str) -> dict:
    runs = [{"scorers": {**{v: scorer(x) for v in variants}, "popularity": scorer(0.01, None)}, "seconds": 10.0,
             "test_targets": {"rec": 5}} for x in r10]
    return {"command": command, "date": "2026-11-24", "git_revision": "abc1234", "seeds": [42, 43][:len(r10)],
            "epochs": 30, "variants": variants, "overrides": overrides, "test_targets": {"rec": 5},
            "exclude_consumed": ["rec"], "runs": runs, "mean_std": {}, "seconds": 20.0}


def test_add_keeps_the_old_rows_and_lists_the_addition():
    old = figure(["synergen", "sasrec"], [0.08, 0.09], ["model.dropout=0.3", "train.output=a"], "first")
    new = figure(["no_text"], [0.05, 0.07], ["train.output=b", "model.dropout=0.3"], "second")
    fig = added(old, new, "beauty")
    assert list(fig["mean_std"]) == ["synergen", "sasrec", "no_text", "popularity"]
    assert fig["mean_std"]["synergen"]["rec.recall@10"] == pytest.approx((0.085, 0.005))
    assert fig["mean_std"]["no_text"]["rec.recall@10"] == pytest.approx((0.06, 0.01))
    assert fig["variants"] == ["synergen", "sasrec", "no_text"] and fig["runs"][0]["seconds"] == 20.0
    text = table("beauty", fig)
    assert "`first`" in text and "Added with `--add` (no_text): `second`" in text
    assert text.index("| synergen |") < text.index("| no_text |") < text.index("| popularity |")



def test_retrieval_score_auc_is_shown_only_where_every_seed_recorded_it():
    old = figure(["synergen", "sasrec"], [0.08, 0.09], ["train.output=a"], "first")  # recorded before the column
    new = figure(["sasrec"], [0.07, 0.07], ["train.output=b"], "second")
    for i, run in enumerate(new["runs"]):
        run["scorers"]["sasrec"]["ranking_retrieval"] = {"rec": {"auc": 0.8 + 0.02 * i}}
    fig = added(old, new, "beauty")
    assert fig["mean_std"]["sasrec"]["rec.retrieval_auc"] == pytest.approx((0.81, 0.01))
    assert "rec.retrieval_auc" not in fig["mean_std"]["synergen"]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in table("beauty", fig).splitlines() if line.startswith("| ")}
    header = rows["| model"]
    col = header.index("retrieval-score AUC (rec)")
    assert rows["| sasrec"][col] == "0.810 ± 0.010" and rows["| synergen"][col] == "—"
    assert all(len(r) == len(header) for r in rows.values())


def test_validation_figure_is_shown_only_where_every_seed_recorded_it():
    fig = figure(["synergen", "sasrec"], [0.08, 0.09], [], "first")
    for i, run in enumerate(fig["runs"]):
        run["scorers"]["synergen"]["best_valid"] = 0.05 + 0.01 * i
    fig["runs"][1]["scorers"]["sasrec"]["best_valid"] = 0.04  # the other seed's run did not record it
    fig = {**fig, "mean_std": aggregate(fig["runs"])}
    rows = {line.split(" | ")[0]: line.split(" | ") for line in table("beauty", fig).splitlines() if line.startswith("| ")}
    col = rows["| model"].index("valid")
    assert rows["| synergen"][col] == "0.0550 ± 0.0050" and rows["| sasrec"][col] == "—"
    assert all(len(r) == len(rows["| model"]) for r in rows.values())


def test_add_refuses_other_settings_or_no_table():
    old = figure(["synergen"], [0.08, 0.09], ["model.dropout=0.3"], "first")
    with pytest.raises(SystemExit, match="model.dropout=0.2"):
        added(old, figure(["no_text"], [0.05, 0.07], ["model.dropout=0.2"], "second"), "beauty")
    with pytest.raises(SystemExit, match="seeds"):
        added(old, figure(["no_text"], [0.05], ["model.dropout=0.3"], "second"), "beauty")
    with pytest.raises(SystemExit, match="no recorded beauty table"):
        added(None, old, "beauty")
    planned = {"seeds": [42, 43], "epochs": 30, "overrides": ["model.dropout=0.3"], "exclude_consumed": ["rec"]}
    refuse_addition(old, planned, "beauty")  # checked before training: the test targets are not known yet
    with pytest.raises(SystemExit, match="'epochs': 20"):
        refuse_addition(old, {**planned, "epochs": 20}, "beauty")


def with_per_target(run: dict, name: str, task: str, ndcg: list[float]) -> None:
    hits = [[i, v] for i, v in enumerate(ndcg) if v]
    run["scorers"].setdefault(name, scorer(0.05))[f"per_target_ndcg@{PAIRED_K}"] = {task: {"n": len(ndcg), "hits": hits}}


def test_paired_comparison_averages_targets_over_seeds_and_bounds_the_gap():
    fig = figure(["synergen", "rec_only"], [0.08, 0.09], [], "first")
    joint = ([1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.5])
    single = ([0.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0])
    for run, a, b in zip(fig["runs"], joint, single):
        with_per_target(run, "synergen", "rec", a)
        with_per_target(run, "rec_only", "rec", b)
    (c,) = paired(fig["runs"])
    # per target, averaged over the two seeds: joint - single = [0.5, -0.25, 0, 0.25]
    assert (c["model"], c["against"], c["task"], c["targets"]) == ("synergen", "rec_only", "rec", 4)
    assert c["mean_diff"] == pytest.approx(0.125) and (c["better"], c["worse"]) == (2, 1)
    lo, hi = c["ci95"]
    assert -0.25 <= lo < 0.125 < hi <= 0.5  # bootstrap means stay within the per-target differences
    text = table("beauty", fig)
    assert "| synergen − rec_only | rec | 4 | +0.1250 |" in text and "2 / 1 |" in text

    del fig["runs"][1]["scorers"]["rec_only"][f"per_target_ndcg@{PAIRED_K}"]  # one seed without: no comparison
    assert paired(fig["runs"]) == [] and "Paired on the same test targets" not in table("beauty", fig)
    same = figure(["synergen", "rec_only"], [0.08], [], "first")
    for name in ("synergen", "rec_only"):
        with_per_target(same["runs"][0], name, "rec", list(np.linspace(0, 1, 50)))
    (c,) = paired(same["runs"])
    assert c["mean_diff"] == 0.0 and c["ci95"] == [0.0, 0.0] and (c["better"], c["worse"]) == (0, 0)
