"""The encoder: decoder-only pre-norm Transformer blocks with rotary q/k and an explicit mask.

The mask comes from ``masks.py`` and the rotation from ``rope.py``; blocks know nothing about token
types or tasks, so every task-specific rule lives in the mask.

Ranking at inference has a cheaper equivalent of the masked pass over ``[history | candidates]``:
candidates see the history and themselves only, and the history never sees them, so the history's
per-layer keys and values can be kept from one history pass (``forward(..., cache=[])``) and each
candidate attended against them (``candidates``). Attention then costs C x (L + 1) per row instead of
(L + C)^2, and the history is encoded once for retrieval and ranking instead of twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synergen_core.config import ModelConfig
from synergen_core.model.rope import apply_rotary


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d)
    if kind == "layernorm":
        return nn.LayerNorm(d)
    raise ValueError(f"unknown norm {kind!r}")


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, d] -> rotated q, k and v, each [B, H, T, hd]."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _out(self, y: Tensor) -> Tensor:
        """[B, H, T, hd] -> [B, T, d]."""
        B, H, T, hd = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: list | None = None) -> Tensor:
        """x: [B, T, d]; cos, sin: [B, 1, T, hd/2]; mask: [B, 1, T, T] bool (True = attend) -> [B, T, d].
        ``cache``: a list that receives this layer's (k, v) for ``candidates``."""
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            cache.append((k, v))
        p = self.dropout if self.training else 0.0
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p))

    def candidates(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], valid: Tensor) -> Tensor:
        """Candidates attending to the cached history and to themselves only.

        x: [B, C, d]; cos, sin: [B, 1, 1, hd/2], the one rotary angle all candidates of a row share;
        kv: history (k, v) [B, H, L, hd], k rotated; valid: [B, L] bool -> [B, C, d]; the same as their
        rows of ``forward`` with ``masks.attention_mask``.

        Rotating q by the candidates' angle a and each history key by its own angle b scores as the
        unrotated q against the key turned back by a, so the L history keys are turned once instead of
        rotating C queries; a candidate's own key has its query's angle, which cancels.
        """
        B, C, d = x.shape
        if cos.shape[2] != 1:
            raise ValueError(f"candidates share one rotary angle per row: cos must be [B, 1, 1, hd/2], got {tuple(cos.shape)}")
        q, k, v = self.qkv(x).view(B, C, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, C, hd]
        hk, hv = kv
        q = q * q.shape[-1] ** -0.5
        to_history = q @ apply_rotary(hk, cos, -sin).transpose(-1, -2)  # [B, H, C, L]
        to_history = to_history.masked_fill(~valid[:, None, None, :], float("-inf"))
        to_self = (q * k).sum(-1, keepdim=True)  # [B, H, C, 1]
        p = torch.cat([to_history, to_self], dim=-1).softmax(-1)
        return self._out(p[..., :-1] @ hv + p[..., -1:] * v)


class MLP(nn.Module):
    def __init__(self, d: int, kind: str, ratio: float):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"unknown mlp {kind!r}")
        self.kind = kind
        # SwiGLU has three matrices; 2/3 of the width keeps its parameter count equal to GELU's.
        hidden = max(1, int(ratio * d * (2 / 3 if kind == "swiglu" else 1)))
        self.up = nn.Linear(d, (2 if kind == "swiglu" else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, T, d]."""
        h = self.up(x)
        if self.kind == "swiglu":
            gate, val = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * val)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp, cfg.mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: list | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))

    def candidates(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], valid: Tensor) -> Tensor:
        x = x + self.attn.candidates(self.norm1(x), cos, sin, kv, valid)
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model)

    def init_residual_(self, std: float = 0.02) -> None:
        """GPT-2 style: shrink the residual-writing projections so the residual stream's variance does
        not grow with depth. Call after any model-wide init, which would overwrite it."""
        for blk in self.blocks:
            for w in (blk.attn.proj.weight, blk.mlp.down.weight):
                nn.init.normal_(w, std=std / math.sqrt(2 * len(self.blocks)))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: list | None = None) -> Tensor:
        """x: [B, T, d] -> final-normed hidden states [B, T, d]. ``cache`` (a list) receives every
        layer's history (k, v) for ``candidates``."""
        for blk in self.blocks:
            x = blk(x, cos, sin, mask, cache)
        return self.norm(x)

    def candidates(self, x: Tensor, cos: Tensor, sin: Tensor, cache: list, valid: Tensor) -> Tensor:
        """Inference only. x: [B, C, d] candidate inputs; cache: from ``forward`` over the history;
        valid: [B, L] history flags -> final-normed candidate hidden states [B, C, d]."""
        for blk, kv in zip(self.blocks, cache, strict=True):
            x = blk.candidates(x, cos, sin, kv, valid)
        return self.norm(x)
