"""Hedgehog feature-map linear attention with an optional exact-softmax sliding window (LoLCATs' hybrid).

`hybrid_attention` is the one entry point the attention modules call; `naive.py` is the ground truth.
"""

from .naive import hedgehog_feature_map, hybrid_attention_naive, hybrid_attention_weights
from .torch_chunked import HybridState, hybrid_attention_chunked

hybrid_attention = hybrid_attention_chunked

__all__ = [
    "HybridState",
    "hedgehog_feature_map",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_naive",
    "hybrid_attention_weights",
]
