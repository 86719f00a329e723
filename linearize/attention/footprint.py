"""Decoding cache size of a model at N tokens, from its settings alone (no forward pass, no weights).

A kept softmax layer, and a kept softmax head, holds keys and values that grow with every token; a converted layer
holds what its kind declares (`AttentionKind.state_bytes`): a constant state for the linear heads plus the kept
heads' growing cache. `cache_bytes_at` gives the teacher's figure beside the model's, so a report can say both.
"""

from __future__ import annotations

from ..errors import LinearizeError
from .heads import config_head_dim, kv_cache_bytes
from .registry import get_attention_kind


def _softmax_layer_bytes(config, layer_idx: int, tokens: int, batch: int, dtype_bytes: int) -> int:
    head_dim = config_head_dim(config)
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window and layer_idx < len(layer_types) and layer_types[layer_idx] == "sliding_attention":
        # A local layer's cache keeps at most its window of tokens.
        tokens = min(tokens, window)
    return kv_cache_bytes(config.num_key_value_heads, head_dim, tokens, batch, dtype_bytes)


def cache_bytes_at(config, tokens: int, batch: int = 1, dtype_bytes: int = 2) -> dict:
    """Bytes of the decoding cache after `tokens` tokens, per layer and in all, and the teacher's.

    Args:
        config: a model config; a converted one carries its settings in `config.linearize` (the chosen layers,
            kinds and softmax heads), a plain one is the teacher.
        tokens: tokens seen (prompt plus generated).
        batch: sequences decoded at once.
        dtype_bytes: bytes per key/value element (2 for bf16/fp16); linear states are fp32 whatever this is.

    Returns:
        `{"tokens", "total", "teacher", "ratio", "layers": {"0": bytes, ...}}`.
    """
    from ..config import AttentionConfig, from_dict

    settings = getattr(config, "linearize", None) or {}
    plan = settings.get("layers", {})
    attention = from_dict(AttentionConfig, settings["attention"]) if settings else None
    layers = {}
    teacher = 0
    for idx in range(config.num_hidden_layers):
        plain = _softmax_layer_bytes(config, idx, tokens, batch, dtype_bytes)
        teacher += plain
        kind = get_attention_kind(plan.get(str(idx), "softmax"))
        if kind.build is None:
            layers[str(idx)] = plain
            continue
        if kind.state_bytes is None:
            raise LinearizeError(f"attention kind '{kind.name}' does not declare its cache size (state_bytes)")
        layers[str(idx)] = kind.state_bytes(config, attention, idx, tokens, batch, dtype_bytes)
    total = sum(layers.values())
    return {"tokens": tokens, "total": total, "teacher": teacher, "ratio": total / teacher, "layers": layers}
