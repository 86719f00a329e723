"""The bundled attention kinds: hedgehog, lolcats and softmax."""

from __future__ import annotations

from .hybrid import HybridLinearAttention
from .registry import AttentionKind, register_attention_kind


def _build_hybrid(original, cfg, layer_idx, window):
    return HybridLinearAttention(
        original,
        original.config,
        layer_idx,
        feature_dim=cfg.feature_dim,
        window=window,
        init_window_factor=cfg.init_window_factor,
        chunk_size=cfg.chunk_size,
    )


register_attention_kind(
    AttentionKind(
        name="hedgehog",
        description="Hedgehog feature-map linear attention over all past tokens, normalised (no window)",
        uses_window=False,
        build=lambda original, cfg, idx: _build_hybrid(original, cfg, idx, window=0),
    )
)
register_attention_kind(
    AttentionKind(
        name="lolcats",
        description="Hedgehog linear attention plus exact softmax over the last `window` tokens, one shared "
        "normaliser, learned per-head window weight (LoLCATs)",
        uses_window=True,
        build=lambda original, cfg, idx: _build_hybrid(original, cfg, idx, window=cfg.window),
    )
)
register_attention_kind(
    AttentionKind(
        name="softmax",
        description="the original softmax attention, kept as it is (for hybrid models)",
        uses_window=False,
        build=None,
    )
)
