"""Lake publication: day markers, a publish killed between its two renames, stale staging folders."""
from synergen_core import lake


def test_day_marker_round_trip(tmp_path):
    assert lake.completed_days(tmp_path, "validated") == []
    m = lake.mark_day_complete(tmp_path, "validated", "2026-01-02", {"_validation.json": '{"ok": true}'})
    assert m == tmp_path / "validated" / "_days" / "ds=2026-01-02"
    assert (m / lake.SUCCESS).is_file() and (m / "_validation.json").read_text() == '{"ok": true}'
    lake.mark_day_complete(tmp_path, "validated", "2026-01-01", {})
    assert lake.completed_days(tmp_path, "validated") == ["2026-01-01", "2026-01-02"]
    lake.unmark_day(tmp_path, "validated", "2026-01-02")
    lake.unmark_day(tmp_path, "validated", "2026-01-05")  # no marker: nothing to do
    assert lake.completed_days(tmp_path, "validated") == ["2026-01-01"]
    assert sorted(p.name for p in (tmp_path / "validated" / "_days").iterdir()) == ["ds=2026-01-01"]
