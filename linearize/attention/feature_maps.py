"""Learnable feature maps that stand in for exp(q . k) in linear attention."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.hybrid import hedgehog_feature_map


class HedgehogFeatureMap(nn.Module):
    """Per-head Hedgehog map phi(x) = [softmax(x W_h), softmax(-x W_h)] over the feature dimension.

    W_h starts as the identity (the first `feature_dim` coordinates of x, zero-padded when `feature_dim` exceeds
    the head size), so phi starts as a softmax over the raw coordinates; the start is deterministic and is
    restored by `reset_parameters` whatever initialisation a loader applied.

    Args:
        num_heads: H, one map per query head.
        head_dim: D, size of each head's input.
        feature_dim: F; the output has 2F features.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.head_dim, self.feature_dim, dtype=self.weight.dtype, device=self.weight.device)
            self.weight.copy_(eye.expand_as(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, H, D]` -> `[B, T, H, 2F]` (fp32)."""
        return hedgehog_feature_map(x, self.weight)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"
