"""The `hedgehog` kind: Hedgehog feature-map linear attention over every past token, normalised, no window."""

from __future__ import annotations

from ..kernels.hybrid import hybrid_attention, hybrid_attention_chunked, naive
from .cache import RecurrentLayer
from .eviction import MARGIN
from .heads import HeadSplit, config_head_dim, softmax_heads_bytes
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
        softmax_kv_heads=cfg.softmax_heads.get(str(layer_idx), ()),
        sparse_cache=cfg.sparse_cache,
        sparse_block=cfg.sparse_block,
        sparse_scorer=cfg.sparse_scorer,
    )


def hybrid_state_bytes(config, cfg, layer_idx: int, tokens: int, batch: int, dtype_bytes: int, window: int) -> int:
    """Bytes of a Hedgehog-family layer's cache after `tokens` tokens: per linear query head the fp32 state
    `[2F, Dv]` and normaliser `[2F]`, the last W-1 raw keys/values of the linear key/value heads and their mask;
    plus the kept softmax heads' keys, values and mask, which grow with `tokens`. A sparse cache of K pairs adds,
    per linear key/value head, K keys and values and their int64 positions, and keeps C - 1 more raw tokens (those
    that left the window since the last update of the kept pairs, `SparseState`); a learned scorer adds the fp32
    scores of the K pairs, `margin` more raw tokens and every raw token's scorer input (key and value again)."""
    head_dim = config_head_dim(config)
    split = HeadSplit.of_layer(config, cfg, layer_idx)
    features, slots = 2 * cfg.feature_dim, max(window - 1, 0)
    sparse = cfg.sparse_cache if window > 0 else 0
    learned = bool(sparse) and cfg.sparse_scorer == "learned"
    if sparse:
        slots = (cfg.sparse_block or window) + window - 2 + (MARGIN if learned else 0)
    linear = 0
    if split.num_linear_heads:
        heads, kv_heads = split.num_linear_heads, len(split.linear_kv)
        pair = 2 * kv_heads * head_dim * dtype_bytes
        per_kept = pair + 8 * kv_heads + (4 * kv_heads if learned else 0)
        per_slot = pair * (2 if learned else 1) + 1
        linear = batch * (4 * heads * features * (head_dim + 1) + slots * per_slot + sparse * per_kept)
    return linear + softmax_heads_bytes(len(split.softmax_kv), head_dim, tokens, batch, dtype_bytes)


register_attention_kind(
    AttentionKind(
        name="hedgehog",
        description="Hedgehog feature-map linear attention over all past tokens, normalised (no window)",
        uses_window=False,
        build=build_hedgehog,
        cache_layer=RecurrentLayer,
        ops=HYBRID_OPS,
        softmax_heads=True,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: hybrid_state_bytes(
            config, cfg, idx, tokens, batch, nbytes, window=0
        ),
    )
)
