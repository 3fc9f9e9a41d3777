"""Daily warm start (synergen_core.warm_start): the plan's rules, and a warm run on the synthetic split that
begins from the champion's weights, grows its ID table for new items and trains only on the windows since
the champion's day."""
import math

import numpy as np
import pytest
import torch
from synthetic_training import N_ITEMS, synthetic_config, synthetic_features, synthetic_split

from synergen_core import checkpoint, warm_start
from synergen_core.train import batch_order, build_model, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW = 3  # items the "champion" never had: the last rows of today's ID table
DAY = "2023-11-15"  # the synthetic events run from 2023-11-14 22:13 UTC into this day


@pytest.fixture(scope="module")
def champion_record(tmp_path_factory):
    """A model trained in full on the synthetic split, cut back to a catalog without the last NEW items."""
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        out = tmp_path_factory.mktemp("champion")
        train(synthetic_config(), synthetic_split(), synthetic_features(), out)
    sd = checkpoint.load(out / checkpoint.MODEL)["state_dict"]
    for k in ("embed.id_emb.weight", "embed.item_text", "embed.codes_rec", "embed.codes_search"):
        sd[k] = sd[k][: N_ITEMS - NEW].clone()
    return sd


def champion(sd, ds="2023-11-14", full_ds="2023-11-14") -> warm_start.Champion:
    return warm_start.Champion("synergen/1", ds, full_ds, sd)


def todays_model(cfg, feats=None):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg, synthetic_split(), feats or synthetic_features())


def test_plan_starts_warm_only_when_every_rule_allows(champion_record):
    cfg = synthetic_config(max_new_item_share=0.1)
    tcfg, model, next_ts = cfg.train, todays_model(cfg), synthetic_split().windows.next_ts
    since = warm_start.day_start(DAY)
    plan = warm_start.plan(tcfg, DAY, model, next_ts, champion(champion_record, ds=DAY))
    assert plan.mode == "warm" and plan.since_ts == since and plan.full_retrain_ds == "2023-11-14"
    assert plan.figures["windows"] == int((next_ts >= since).sum()) > 0
    assert plan.figures["new_item_share"] == pytest.approx(NEW / (N_ITEMS - 1))
    assert plan.figures["sid_change_share"] == 0.0

    def why(tcfg=tcfg, model=model, champ=champion(champion_record, ds=DAY)):
        p = warm_start.plan(tcfg, DAY, model, next_ts, champ)
        assert p.mode == "full" and p.full_retrain_ds == DAY
        return p.reason

    assert why(champ=None) == "no champion to start from"
    assert why(tcfg=tcfg.model_copy(update={"warm_start": False})) == "train.warm_start is off"
    assert "8 days since the last full retrain (2023-11-07)" in why(champ=champion(champion_record, DAY, "2023-11-07"))
    assert "7.5% of today's items are new" in why(tcfg=tcfg.model_copy(update={"max_new_item_share": 0.05}))
    assert "no training window is newer" in why(champ=champion(champion_record, ds="2023-11-20"))
    wider = synthetic_config()
    wider.model = wider.model.model_copy(update={"d_model": 32})
    assert "do not fit today's model: embed.id_emb.weight is (41, 32) today, (38, 16)" in why(model=todays_model(wider))
    feats = synthetic_features()
    feats.rec_codes[1:4] = (feats.rec_codes[1:4] + 1) % 8  # 3 of the champion's 37 items recoded: 8.1%
    assert "semantic IDs of 8.1% of the champion's items changed" in why(model=todays_model(cfg, feats))


def test_a_warm_run_begins_from_the_champion_and_trains_on_the_windows_since_its_day(champion_record, tmp_path):
    cfg = synthetic_config(max_new_item_share=0.1, warm_lr=1e-9, warm_epochs=1, epochs=5)
    data, feats = synthetic_split(), synthetic_features()
    n = len(data.windows)  # requests a minute apart, the first half before the champion's day
    data.windows.next_ts = warm_start.day_start(DAY) + 60.0 * (np.arange(n) - n // 2)
    summary = train(cfg, data, feats, tmp_path, daily=(DAY, champion(champion_record, ds=DAY)))
    start = summary["start"]
    assert start["mode"] == "warm" and start["champion_version"] == "synergen/1" and "windows since" in start["reason"]
    since = data.windows.next_ts >= warm_start.day_start(DAY)
    assert summary["epochs_run"] == 1  # train.warm_epochs, not train.epochs
    assert summary["steps"] == len(batch_order(data.windows.lengths[since], cfg.train, 0)) < len(
        batch_order(data.windows.lengths, cfg.train, 0))

    # at a learning rate of 1e-9 the weights are where they started: the champion's, and today's fresh rows
    kept = checkpoint.load(tmp_path / checkpoint.MODEL)["state_dict"]
    fresh = todays_model(cfg).state_dict()
    for name, value in kept.items():
        if name in warm_start.TODAYS:
            assert torch.equal(value, fresh[name]), name  # today's text vectors and codes
        elif name == "embed.id_emb.weight":
            assert torch.allclose(value[: N_ITEMS - NEW], champion_record[name], atol=1e-6)
            assert torch.allclose(value[N_ITEMS - NEW:], fresh[name][N_ITEMS - NEW:], atol=1e-6)  # new items
        else:
            assert torch.allclose(value, champion_record[name], atol=1e-6), name

    # a rerun finds the finished warm run (the plan is part of what a checkpoint must match)
    again = train(cfg, data, feats, tmp_path, daily=(DAY, champion(champion_record, ds=DAY)))
    assert again["resumed"] and again["start"] == start and again["steps"] == summary["steps"]
    assert math.isfinite(summary["history"][0]["loss"])


def test_changed_code_share_counts_the_champions_items_only():
    today = torch.tensor([[0, 0], [1, 2], [3, 4], [5, 6], [7, 7]])
    assert warm_start.changed_code_share(today, today[:3]) == 0.0  # new items (rows 3, 4) do not count
    assert warm_start.changed_code_share(today, torch.tensor([[0, 0], [1, 2], [3, 5]])) == 0.5
    assert warm_start.changed_code_share(today, today[:, :1]) == 1.0  # another number of levels
    assert warm_start.changed_code_share(None, None) == 0.0 and warm_start.changed_code_share(today, None) == 1.0
    assert np.isclose(warm_start.day_start("2023-11-15"), 1700006400.0)
