"""Forget gates of the gated kinds: per-step log decays g <= 0 computed from the layer input or the teacher's keys.

Each gate maps `hidden [B, T, hidden]` (and the projected keys) to `g [B, T, Hg, K]`, Hg = query or kv heads, and
starts near 1 (almost no forgetting), so a converted layer starts as the teacher's un-gated linear attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Bias of a learned gate at the start: logsigmoid(6) / 16 = -1.6e-4 per token, e^-0.16 over 1000 tokens.
INIT_GATE_BIAS = 6.0


class LowRankGate(nn.Module):
    """fla's GLA gate: g = logsigmoid(x W_down W_up + b) / tau, per head and channel.

    W_up starts at zero, so the gate starts at logsigmoid(b) / tau for every token and trains like a LoRA pair.

    Args:
        hidden_size: width of the layer input.
        heads: Hg.
        channels: K, the key feature size the gate decays.
        rank: inner width of the low-rank projection.
        tau: temperature dividing the log gate (fla uses 16).
    """

    def __init__(self, hidden_size: int, heads: int, channels: int, rank: int = 16, tau: float = 16.0):
        super().__init__()
        self.heads, self.channels, self.tau = heads, channels, tau
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, heads * channels, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=self.down.in_features**-0.5)
            self.up.weight.zero_()
            self.up.bias.fill_(INIT_GATE_BIAS)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.up(self.down(hidden.to(self.down.weight.dtype)))
        return (F.logsigmoid(logits.float()) / self.tau).unflatten(-1, (self.heads, self.channels))


class HeadGate(nn.Module):
    """Lizard's gate: one decay per head and token, g = logsigmoid(x w_h + b_h) / tau, shared by the channels.

    Args:
        hidden_size: width of the layer input.
        heads: H.
        tau: temperature dividing the log gate.
    """

    def __init__(self, hidden_size: int, heads: int, tau: float = 16.0):
        super().__init__()
        self.tau = tau
        self.proj = nn.Linear(hidden_size, heads, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(INIT_GATE_BIAS)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return (F.logsigmoid(self.proj(hidden.to(self.proj.weight.dtype)).float()) / self.tau)[..., None]


class PooledKeyGate(nn.Module):
    """Liger's parameter-free gate: g = logsigmoid(pool(k)) / tau from the teacher's key projection, pooled over
    each kv head's channels to the K channels the gate decays (the identity when K equals the head size).

    Args:
        channels: K.
        tau: temperature dividing the log gate (Liger uses 16).
    """

    def __init__(self, channels: int, tau: float = 16.0):
        super().__init__()
        self.channels, self.tau = channels, tau

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        B, T, Hkv, D = keys.shape
        pooled = keys.float()
        if D != self.channels:
            pooled = F.adaptive_avg_pool1d(pooled.reshape(B * T * Hkv, 1, D), self.channels).view(B, T, Hkv, -1)
        return F.logsigmoid(pooled) / self.tau


def gate_half_life(g: torch.Tensor) -> float:
    """Median number of tokens after which a gate has halved what it keeps (for logs and tests)."""
    return float(math.log(0.5) / g.float().clamp(max=-1e-12).median())
