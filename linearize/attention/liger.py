"""The `liger` kind (Liger): parameter-free gated linear attention mixed half-and-half with a sliding window.

No new parameters: q and k (after the teacher's norms and RoPE) pass through a softmax over the head dimension, the
forget gate is logsigmoid(k_proj(x)) / 16 from the teacher's own key projection (Liger's pooled-key gate), and the
output is 0.5 * sliding-window softmax (64 tokens) + 0.5 * normalised GLA. Liger trains only LoRA on q/k/v (no
attention transfer). Decoding state: the gated sums and the window's last W - 1 keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LinearizeError
from .cache import RecurrentLayer
from .gated import GATED_WINDOW_CONTROLS, GatedAttention, gated_state_bytes
from .gates import PooledKeyGate
from .gla import GLA_OPS, MAX_CHUNK
from .heads import HeadSplit
from .registry import AttentionKind, register_attention_kind


@dataclass
class LigerOptions:
    """Attributes:
    gate_tau: temperature dividing the log gate (Liger: 16).
    """

    gate_tau: float = 16.0

    def __post_init__(self):
        if self.gate_tau <= 0:
            raise LinearizeError(f"attention.options.gate_tau must be > 0, got {self.gate_tau}")


def build_liger(original, cfg, layer_idx: int) -> GatedAttention:
    gate = PooledKeyGate(original.head_dim, cfg.kind_options().gate_tau)
    return GatedAttention(original, layer_idx, gate, feature="softmax", window=cfg.window, mix="average",
                          chunk_size=min(cfg.chunk_size, MAX_CHUNK), window_chunk_size=cfg.chunk_size,
                          softmax_kv_heads=HeadSplit.of_layer(original.config, cfg, layer_idx).softmax_kv)  # fmt: skip


register_attention_kind(
    AttentionKind(
        name="liger",
        description="parameter-free gated linear attention (softmax features, pooled-key gate) averaged with a "
        "sliding-window softmax (Liger)",
        uses_window=True,
        build=build_liger,
        cache_layer=RecurrentLayer,
        ops=GLA_OPS,
        controls=GATED_WINDOW_CONTROLS,
        options=LigerOptions,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: gated_state_bytes(
            config, cfg, idx, tokens, batch, nbytes, features=None, window=cfg.window
        ),
        softmax_heads=True,
    )
)
