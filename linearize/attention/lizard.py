"""The `lizard` kind (Lizard): gated linear attention without RoPE plus a sliding window with sink logits.

New parameters (stage 1 trains them): the Hedgehog feature maps of q and k (identity start), a per-head scalar
forget gate from the layer input `gate.proj` (g = logsigmoid(x w + b) / 16; w zero and b = 6 at the start, near 1)
that stands in for RoPE on the linear branch, and `sinks`, learnable sink logits per head ("meta memory", 4 by
default, starting at 0) that add to the window's normaliser. The window branch is exact softmax over the last
`window` tokens (Lizard: 128) on the teacher's rotated q/k; both branches share one normaliser. Decoding state: the
gated sums and the window's last W - 1 keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LinearizeError
from .cache import RecurrentLayer
from .gated import GATED_WINDOW_CONTROLS, GatedAttention, gated_state_bytes
from .gates import HeadGate
from .gla import GLA_OPS, MAX_CHUNK
from .heads import HeadSplit
from .registry import AttentionKind, register_attention_kind


@dataclass
class LizardOptions:
    """Attributes:
    sinks: learnable sink logits per head (Lizard: 4); 0 for none.
    gate_tau: temperature dividing the log gate.
    """

    sinks: int = 4
    gate_tau: float = 16.0

    def __post_init__(self):
        if self.sinks < 0 or self.gate_tau <= 0:
            raise LinearizeError(f"attention.options: sinks must be >= 0 and gate_tau > 0, got {self}")


def build_lizard(original, cfg, layer_idx: int) -> GatedAttention:
    opts = cfg.kind_options()
    split = HeadSplit.of_layer(original.config, cfg, layer_idx)
    gate = HeadGate(original.config.hidden_size, split.num_linear_heads, opts.gate_tau)
    return GatedAttention(original, layer_idx, gate, feature="hedgehog", feature_dim=cfg.feature_dim,
                          rope_linear=False, window=cfg.window, sinks=opts.sinks, mix="shared",
                          chunk_size=min(cfg.chunk_size, MAX_CHUNK), window_chunk_size=cfg.chunk_size,
                          softmax_kv_heads=split.softmax_kv)  # fmt: skip


register_attention_kind(
    AttentionKind(
        name="lizard",
        description="gated linear attention on un-rotated q/k plus sliding-window softmax with sink logits, one "
        "shared normaliser (Lizard)",
        uses_window=True,
        build=build_lizard,
        cache_layer=RecurrentLayer,
        ops=GLA_OPS,
        controls=GATED_WINDOW_CONTROLS,
        options=LizardOptions,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: gated_state_bytes(
            config, cfg, idx, tokens, batch, nbytes, features=2 * cfg.feature_dim, window=cfg.window
        ),
        softmax_heads=True,
    )
)
