"""Time-aware rotary embeddings: attention depends only on position and time differences."""
import torch

from synergen_core.model.rope import RotaryEmbedding, apply_rotary

HD, T = 16, 6


def _scores(rope: RotaryEmbedding, q, k, position, ts):
    cos, sin = rope(position, ts)
    return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)  # [B, H, T, T]


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, T, HD, generator=g), torch.randn(2, 2, T, HD, generator=g)
    position = torch.arange(T).expand(2, T)
    gaps = torch.tensor([0.0, 3.0, 60.0, 3_600.0, 86_400.0, 30 * 86_400.0])
    ts = (1.7e9 + gaps.cumsum(0)).to(torch.float64).expand(2, T)
    return q, k, position, ts


def test_shifting_all_timestamps_changes_no_score():
    rope = RotaryEmbedding(HD, "time")
    q, k, position, ts = _inputs()
    base = _scores(rope, q, k, position, ts)
    for shift in (1.0, 12_345.678, -1.0e9, 3.0e8):
        torch.testing.assert_close(_scores(rope, q, k, position, ts + shift), base, atol=1e-5, rtol=1e-5)


def test_shifting_all_positions_changes_no_score():
    for mode in ("time", "position"):
        rope = RotaryEmbedding(HD, mode)
        q, k, position, ts = _inputs()
        base = _scores(rope, q, k, position, ts)
        torch.testing.assert_close(_scores(rope, q, k, position + 37, ts), base, atol=1e-4, rtol=1e-4)


def test_different_gaps_change_scores():
    rope = RotaryEmbedding(HD, "time")
    q, k, position, ts = _inputs()
    base = _scores(rope, q, k, position, ts)
    later = ts.clone()
    later[:, -1] += 7 * 86_400.0  # the last event a week later, same order
    changed = _scores(rope, q, k, position, later)
    assert (changed[..., -1, :-1] - base[..., -1, :-1]).abs().max() > 1e-3
    # pairs not involving the moved token keep their scores
    torch.testing.assert_close(changed[..., :-1, :-1], base[..., :-1, :-1], atol=1e-5, rtol=1e-5)


def test_both_second_and_year_scale_gaps_are_resolved():
    rope = RotaryEmbedding(HD, "time", min_period_s=1.0, max_period_s=3.2e8)
    position = torch.zeros(1, 2, dtype=torch.long)
    n_time = rope.time_freq.numel()
    # seconds apart: told apart by the fastest time pair; about a year apart: by the slowest one,
    # whose angle stays below a full turn so the difference is not an aliasing accident
    for gap, pair in ((2.0, HD // 2 - n_time), (3.0e7, HD // 2 - 1)):
        a = rope.angles(position, torch.tensor([[1.7e9, 1.7e9 + gap]], dtype=torch.float64))[0, 0, pair]
        b = rope.angles(position, torch.tensor([[1.7e9, 1.7e9 + gap * 1.25]], dtype=torch.float64))[0, 0, pair]
        assert abs(a.cos() - b.cos()) + abs(a.sin() - b.sin()) > 1e-2
    assert rope.time_freq[-1] * 3.0e7 * 1.25 < 2 * torch.pi


def test_ordinary_rope_ignores_timestamps():
    rope = RotaryEmbedding(HD, "position")
    q, k, position, ts = _inputs()
    base = _scores(rope, q, k, position, ts)
    scrambled = torch.rand(2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e9
    torch.testing.assert_close(_scores(rope, q, k, position, scrambled), base)
    torch.testing.assert_close(_scores(rope, q, k, position, None), base)


def test_rotation_preserves_norm():
    rope = RotaryEmbedding(HD, "time")
    q, _, position, ts = _inputs()
    cos, sin = rope(position, ts)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
