"""The `hedgehog` kind: Hedgehog feature-map linear attention over every past token, normalised, no window."""

from __future__ import annotations

from ..kernels.hybrid import hybrid_attention, hybrid_attention_chunked, naive
from .cache import RecurrentLayer
from .hybrid import HybridLinearAttention
from .registry import AttentionKind, register_attention_kind

# The ops every kind of the Hedgehog family calls: the dispatcher (Triton on CUDA), the PyTorch path, the truth.
HYBRID_OPS = {
    "hybrid_attention": hybrid_attention,
    "hybrid_attention_chunked": hybrid_attention_chunked,
    "naive": naive.hybrid_attention_naive,
}


def build_hedgehog(original, cfg, layer_idx: int, window: int = 0) -> HybridLinearAttention:
    """The module of every Hedgehog-family kind, around `original`; `window` 0 gives plain linear attention."""
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
        build=build_hedgehog,
        cache_layer=RecurrentLayer,
        ops=HYBRID_OPS,
    )
)
