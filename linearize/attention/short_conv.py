"""Causal depthwise convolution over time (LAWCAT's short conv on q/k/v), with the decoding state it carries.

y_t = sum_{i < W} w_i x_{t - i} per channel, W the kernel size. It starts as the identity (w_0 = 1, the rest 0),
so a converted layer starts from the teacher's projections. Tokens of another packed sequence and padding tokens
count as zeros, as at a sequence's start; decoding carries the last W - 1 inputs.
"""

from __future__ import annotations

import torch
from torch import nn


class ShortConv(nn.Module):
    """Depthwise causal conv1d.

    Args:
        channels: C, the width of the input's last dimension.
        kernel_size: W (LAWCAT uses 4).
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        # weight[i, c] multiplies x_{t - i}.
        self.weight = nn.Parameter(torch.empty(kernel_size, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[0] = 1.0

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `[B, T, C]`, `state` `[B, W - 1, C]` (the previous inputs, oldest first) -> (`[B, T, C]`, next state).

        `token_mask` `[B, T]` (False for padding) zeroes those inputs."""
        B, T, C = x.shape
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)
        if state is None:
            state = x.new_zeros(B, self.kernel_size - 1, C)
        full = torch.cat([state.to(x.dtype), x], dim=1)
        w = self.weight.to(x.dtype)
        out = sum(
            w[i] * full[:, self.kernel_size - 1 - i : self.kernel_size - 1 - i + T] for i in range(self.kernel_size)
        )
        return out, full[:, full.shape[1] - (self.kernel_size - 1) :]

    def packed(self, x, state, token_mask, cu_seqlens):
        """`forward`, except that with `cu_seqlens` each packed sequence starts its conv from zeros (and no state
        is returned)."""
        if cu_seqlens is None:
            return self(x, state, token_mask)
        bounds = cu_seqlens.tolist()
        parts = [
            self(x[:, a:b], None, token_mask[:, a:b] if token_mask is not None else None)[0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(parts, 1), None
