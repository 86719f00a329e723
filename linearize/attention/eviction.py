"""Learned token eviction for the sparse cache: a small network that scores which past pairs stay exact.

After "Alleviating Forgetfulness of Linear Attention by Hybrid Sparse Attention and Contextualized Learnable Token
Eviction" (He and Garner, 2025): per key/value head, a stack of 1-D convolutions over the tokens (kernel 3, each
layer halving the channels, SiLU between) reads each token's key before RoPE and its value, and those of its
neighbours up to `margin` = layers x (kernel // 2) positions away on both sides, and gives one score, added to
the log of LoLA's recall error when the sparse cache ranks its candidates (`attention.sparse_scorer: learned`). The
score starts at 0 (a zero last layer), so a new scorer chooses as LoLA does, and training moves it away where the
kept pairs help or do not; the op passes the gradient to the scores straight through the kept pairs
(kernels/hybrid/sparse.py). Scoring from keys before RoPE keeps the scores free of position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Scorer shape: these many convolutions of this kernel size; each halves the channels, down to at least MIN_WIDTH.
LAYERS = 3
KERNEL = 3
MIN_WIDTH = 4
MARGIN = LAYERS * (KERNEL // 2)


class TokenScorer(nn.Module):
    """Scores `[B, N, Hkv]` (fp32) for scorer inputs `x` `[B, N, Hkv, E]`, one independent network per kv head.

    Inputs where `ok` `[B, N]` is False count as zeros, and so do the activations there after every layer, so a
    token's score depends only on the real tokens within `margin` of it, whatever lies beyond.
    """

    margin = MARGIN

    def __init__(self, kv_heads: int, in_dim: int, device=None, dtype=None):
        super().__init__()
        self.kv_heads, self.in_dim = kv_heads, in_dim
        widths = [in_dim]
        for _ in range(LAYERS):
            widths.append(max(widths[-1] // 2, MIN_WIDTH))
        self.convs = nn.ModuleList(
            nn.Conv1d(
                kv_heads * a, kv_heads * b, KERNEL, padding=KERNEL // 2, groups=kv_heads, device=device, dtype=dtype
            )  # fmt: skip
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.proj = nn.Conv1d(kv_heads * widths[-1], kv_heads, 1, groups=kv_heads, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fixed by the run's seed) and a zero last layer: every score starts at 0."""
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        B, N, H, E = x.shape
        # In the weights' dtype: a trained scorer is fp32 beside a bf16 model (`float_new_parameters`).
        dtype = self.proj.weight.dtype
        m = ok[:, None, :].to(dtype)
        h = (x.to(dtype) * ok[:, :, None, None]).reshape(B, N, H * E).transpose(1, 2)
        for conv in self.convs:
            h = F.silu(conv(h) * m)
        return self.proj(h).transpose(1, 2).float()
