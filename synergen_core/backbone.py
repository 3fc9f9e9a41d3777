"""The encoder: decoder-only pre-norm Transformer blocks with rotary q/k and an explicit mask.

The mask comes from ``masks.py`` and the rotation from ``rope.py``; blocks know nothing about token
types or tasks, so every task-specific rule lives in the mask.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from synergen_core.config import ModelConfig
from synergen_core.rope import apply_rotary


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x: [B, T, d]; cos, sin: [B, 1, T, hd/2]; mask: [B, 1, T, T] bool (True = attend) -> [B, T, d]."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3x [B, H, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x: [B, T, d] -> final-normed hidden states [B, T, d]."""
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        return self.norm(x)
