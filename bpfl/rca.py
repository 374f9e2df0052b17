"""Residual cross-modal attention (paper §3.4, Eq. 10)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualCrossModalAttention(nn.Module):
    """Refine text embeddings with the patch features they are aligned with (Eq. 10).

        F^t = Z + softmax(Q (F^I)^T / sqrt(C)) F^I,    Q = Z W,  W in R^{C x C}

    ``Z`` [..., T, C] are text embeddings (T = 2 for one normal/abnormal pair; several pairs can be passed at
    once because every query row attends independently), ``F^I`` [..., HW, C] the projected patch features of
    one layer (keys = values = F^I, no other projections). The released code's variant is reachable by
    switches: ``heads=4`` (the C dims split into heads, scale kept at 1/sqrt(C)), ``bias=True`` on W, and
    ``normalize_output=True`` (L2-normalise the result). With W = 0 the attention is uniform and the output is
    Z + mean(F^I).
    """

    def __init__(self, dim: int, heads: int = 1, bias: bool = False, normalize_output: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"RCA: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.normalize_output = dim, heads, normalize_output
        self.query = nn.Linear(dim, dim, bias=bias)  # W (the released code's q_proj_pre, a 1x1 Conv1d)
        self.scale = 1.0 / math.sqrt(dim)

    def attention(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """softmax(Q F^T / sqrt(C)) per head: [..., heads, T, HW]."""
        q = self.query(text)
        h, d = self.heads, self.dim // self.heads
        q = q.unflatten(-1, (h, d)).transpose(-2, -3)  # [..., h, T, d]
        k = patches.unflatten(-1, (h, d)).transpose(-2, -3)  # [..., h, HW, d]
        return torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        h, d = self.heads, self.dim // self.heads
        attn = self.attention(text, patches)
        v = patches.unflatten(-1, (h, d)).transpose(-2, -3)
        out = (attn @ v).transpose(-2, -3).flatten(-2)  # [..., T, C]
        out = text + out
        return F.normalize(out, dim=-1) if self.normalize_output else out
