"""The `lolcats` kind: Hedgehog linear attention plus exact softmax over the last `window` tokens (LoLCATs);
`attention.sparse_cache` adds LoLA's sparse cache of the past pairs the linear state recalls worst."""

from __future__ import annotations

from ..kernels.hybrid import sparse, sparse_naive
from .cache import RecurrentLayer
from .hedgehog import HYBRID_OPS, build_hedgehog, hybrid_state_bytes
from .hybrid import WINDOW_CONTROLS
from .registry import AttentionKind, register_attention_kind

register_attention_kind(
    AttentionKind(
        name="lolcats",
        description="Hedgehog linear attention plus exact softmax over the last `window` tokens, one shared "
        "normaliser, learned per-head window weight (LoLCATs)",
        uses_window=True,
        build=lambda original, cfg, idx: build_hedgehog(original, cfg, idx, window=cfg.window),
        cache_layer=RecurrentLayer,
        ops=HYBRID_OPS
        | {
            "sparse_hybrid_attention": sparse.sparse_hybrid_attention,
            "sparse_naive": sparse_naive.sparse_hybrid_attention_naive,
        },
        controls=WINDOW_CONTROLS,
        sparse_cache=True,
        softmax_heads=True,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: hybrid_state_bytes(
            config, cfg, idx, tokens, batch, nbytes, window=cfg.window
        ),
    )
)
