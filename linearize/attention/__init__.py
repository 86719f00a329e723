"""Attention kinds that replace softmax attention, their feature maps and the generation cache."""

from . import kinds  # noqa: F401  (registers the bundled kinds)
from .cache import LinearizeCache, RecurrentLayer
from .hybrid import TOKEN_MASK_KWARG, HybridLinearAttention
from .registry import ATTENTION_KINDS, AttentionKind, get_attention_kind, register_attention_kind

__all__ = [
    "ATTENTION_KINDS",
    "AttentionKind",
    "HybridLinearAttention",
    "LinearizeCache",
    "RecurrentLayer",
    "TOKEN_MASK_KWARG",
    "get_attention_kind",
    "register_attention_kind",
]
