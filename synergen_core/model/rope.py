"""Time-aware rotary position embeddings (SynerGen): rotation angles from token order *and* real time.

A head's dims are split into two halves paired elementwise: pair j rotates (x[j], x[j + hd/2]) by
angle[j]. In ``"time"`` mode the first half of the pairs use standard RoPE frequencies over the token
position and the second half use frequencies over the timestamp, with periods log-spaced from
``min_period_s`` (seconds apart) to ``max_period_s`` (years apart). In ``"position"`` mode every pair
uses standard RoPE over the position and timestamps are ignored (the ablation).

Rotating q_i by angle_i and k_j by angle_j makes q_i . k_j a function of angle_i - angle_j only, so
attention depends on position and time *differences*: shifting every timestamp (or every position) of a
sequence by a constant changes no score.

Timestamps are epoch seconds (~1.7e9); float32 resolves those only to ~2 minutes. Angles are therefore
computed in float64 after subtracting a per-sequence reference time (the latest valid timestamp), a
constant shift that changes nothing else and keeps second-level gaps exact.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        mode: str = "time",
        base: float = 10_000.0,
        min_period_s: float = 1.0,
        max_period_s: float = 3.2e8,
    ):
        super().__init__()
        if head_dim % 2 or head_dim < 2:
            raise ValueError(f"rotary head_dim must be even and >= 2, got {head_dim}")
        if mode not in ("time", "position"):
            raise ValueError(f"rope mode must be 'time' or 'position', got {mode!r}")
        if not 0 < min_period_s < max_period_s:
            raise ValueError(f"need 0 < min_period_s < max_period_s, got {min_period_s}, {max_period_s}")
        n_pairs = head_dim // 2
        n_time = n_pairs // 2 if mode == "time" else 0
        n_pos = n_pairs - n_time
        self.mode, self.n_pairs = mode, n_pairs
        # Standard RoPE: base^(-2j/d) over the 2*n_pos dims these pairs cover.
        pos_freq = base ** (-torch.arange(n_pos, dtype=torch.float64) / n_pos)
        periods = torch.logspace(math.log10(min_period_s), math.log10(max_period_s), n_time, dtype=torch.float64)
        self.register_buffer("pos_freq", pos_freq, persistent=False)  # [n_pos] radians per position
        self.register_buffer("time_freq", 2 * math.pi / periods, persistent=False)  # [n_time] rad/s

    def angles(self, position: Tensor, ts: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """position, ts: [B, T]; valid: [B, T] bool (which tokens define the reference time) -> [B, T, n_pairs] f64."""
        ang = position.to(torch.float64)[..., None] * self.pos_freq  # [B, T, n_pos]
        if self.time_freq.numel() == 0:
            return ang
        if ts is None:
            raise ValueError("time-aware rotary embedding needs timestamps (ts)")
        t = ts.to(torch.float64)
        keep = torch.ones_like(t, dtype=torch.bool) if valid is None else valid
        ref = t.masked_fill(~keep, -math.inf).amax(dim=1, keepdim=True)  # [B, 1]
        ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))  # rows without valid tokens
        rel = (t - ref).masked_fill(~keep, 0.0)  # [B, T]
        return torch.cat([ang, rel[..., None] * self.time_freq], dim=-1)  # [B, T, n_pairs]

    def forward(
        self, position: Tensor, ts: Tensor | None = None, valid: Tensor | None = None, dtype=torch.float32
    ) -> tuple[Tensor, Tensor]:
        """-> cos, sin: [B, 1, T, n_pairs], broadcastable over heads."""
        ang = self.angles(position, ts, valid)[:, None]  # [B, 1, T, n_pairs]
        return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos, sin: [B, 1, T, hd/2] -> x rotated pairwise, same shape."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
