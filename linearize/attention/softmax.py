"""The `softmax` kind: the original attention kept as it is, with its key/value cache (for hybrid models)."""

from __future__ import annotations

from .registry import AttentionKind, register_attention_kind

register_attention_kind(
    AttentionKind(
        name="softmax",
        description="the original softmax attention, kept as it is (for hybrid models)",
        uses_window=False,
        build=None,
    )
)
