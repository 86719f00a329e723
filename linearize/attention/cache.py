"""Generation cache for converted models: constant-size recurrent state for linear layers.

`LinearizeCache` is a transformers `DynamicCache`, so layers kept as softmax (and Gemma's local sliding-window
layers) keep their usual key/value cache and every part of `generate` works unchanged; each converted layer's
slot is the cache layer its attention kind declares (`AttentionKind.cache_layer`), by default a `RecurrentLayer`
that holds the kind's state object, whose size does not depend on how many tokens have been seen.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from .registry import get_attention_kind


class LayerState(Protocol):
    """What a kind's decoding state offers the cache (e.g. `HybridState`; any immutable bundle of tensors)."""

    def index_select(self, indices: torch.Tensor) -> LayerState: ...

    def repeat_interleave(self, repeats: int) -> LayerState: ...

    def to(self, device: torch.device) -> LayerState: ...

    def tensors(self) -> list[torch.Tensor]: ...


class RecurrentLayer(CacheLayerMixin):
    """Cache slot of one converted layer: a fixed-size recurrent state (the kind's `LayerState`) and a token
    count. The converted module reads `state` and hands back the next one through `advance`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: LayerState | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("a converted (linear) layer keeps a recurrent state, not a key/value cache")

    def advance(self, state: LayerState, n_tokens: int) -> None:
        """Store the state after `n_tokens` more tokens."""
        self.state = state
        self.seen_tokens += n_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks built for this index serve the softmax layers of a hybrid model, which see every past token.
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen_tokens, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a recurrent state cannot be cropped (assisted decoding is not supported)")

    def offload(self) -> None:
        if self.state is not None:
            self.state = self.state.to(torch.device("cpu"))

    def prefetch(self) -> None:
        pass

    def nbytes(self) -> int:
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors())


class LinearizeCache(DynamicCache):
    """A `DynamicCache` whose converted layers hold recurrent state instead of growing key/value tensors.

    Args:
        config: the model's (linearized) config; `config.linearize["layers"]` says which layers are converted.
    """

    def __init__(self, config, **kwargs):
        super().__init__(config=config)
        while len(self.layers) < config.num_hidden_layers:
            self.layers.append(_plain_layer())
        for idx, kind in converted_layer_kinds(config).items():
            self.layers[idx] = get_attention_kind(kind).cache_layer()

    def recurrent_layer(self, layer_idx: int) -> RecurrentLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, RecurrentLayer):
            raise RuntimeError(f"cache layer {layer_idx} is {type(layer).__name__}, expected RecurrentLayer")
        return layer

    def nbytes(self) -> int:
        """Bytes held by the cache: recurrent states plus any softmax layers' keys and values."""
        return cache_bytes(self)


def cache_bytes(cache) -> int:
    """Bytes held by any transformers cache: each layer's recurrent state, or its key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, RecurrentLayer):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _plain_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer()


def converted_layer_kinds(config) -> dict[int, str]:
    """Attention kind of each layer that holds a decoding state of its own, from the config's conversion settings."""
    layers = (getattr(config, "linearize", None) or {}).get("layers", {})
    plan = {int(i): kind for i, kind in layers.items()}
    return {i: plan[i] for i in sorted(plan) if get_attention_kind(plan[i]).cache_layer is not None}
