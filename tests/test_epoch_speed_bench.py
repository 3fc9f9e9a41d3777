"""benchmarks.epoch_speed: RecBole's copy of the data and the time-to-quality figure."""
from benchmarks.epoch_speed import seconds_to_reach
from benchmarks.recbole_sasrec import write_inter


def test_recbole_atomic_file_keeps_each_users_order_as_its_timestamps(tmp_path):
    seqs = tmp_path / "sequential_data.txt"
    seqs.write_text("1 5 3 9\n2 3\n")
    assert write_inter(seqs, tmp_path / "beauty") == 4
    lines = (tmp_path / "beauty" / "beauty.inter").read_text().splitlines()
    assert lines == ["user_id:token\titem_id:token\ttimestamp:float",
                     "1\t5\t0", "1\t3\t1", "1\t9\t2", "2\t3\t0"]


def test_seconds_to_reach_sums_the_epochs_until_the_recall_is_first_reached():
    run = {"per_epoch_seconds": [10.0, 12.0, 11.0],
           "valid": [{"recall@10": 0.02}, {"recall@10": 0.05}, {"recall@10": 0.04}]}
    assert seconds_to_reach(run, 0.05) == 22.0
    assert seconds_to_reach(run, 0.02) == 10.0
    assert seconds_to_reach(run, 0.06) is None
