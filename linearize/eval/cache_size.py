"""What a model keeps between decoding steps, in bytes, at any context length.

A two-token forward builds the model's real cache; each layer of it is then one of three kinds:
- a converted layer (`RecurrentLayer`): a fixed size at any length, split into the linear state (kv, ksum) and
  the sliding window of raw keys and values (with its mask);
- a softmax layer with a sliding window (`DynamicSlidingWindowLayer`, e.g. Gemma's local layers): keys and values
  of at most `sliding_window - 1` tokens, as transformers keeps them;
- any other softmax layer: keys and values of every token.
Bytes per token come from the real tensors (dtype, kv heads, head size), so the formula holds for any family and
dtype; tests check it against the tensors of a cache after a forward of N tokens.
"""

from __future__ import annotations

import torch

from .. import _compat
from ..attention.cache import RecurrentLayer


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _window_parts(state) -> list:
    """The sliding-window buffers of a kind's state, whatever the kind calls its state's parts."""
    if hasattr(state, "win_k"):
        return [state.win_k, state.win_v, state.win_mask]
    if hasattr(state, "tail_k"):
        # A sparse cache's raw recent tokens: the window and those waiting for the next update of the kept pairs
        # (with a learned scorer, also their scorer inputs).
        return [state.tail_k, state.tail_v, state.tail_mask, getattr(state, "tail_x", None)]
    window = getattr(state, "window", None)
    return list(window.tensors()) if window is not None else []


def _recurrent_row(state, seen: int) -> dict:
    """A converted layer's state after `seen` tokens: constant linear state and window, plus what kept softmax
    heads add per token (`bytes_per_token`), from the tensors the state holds."""
    per_token = state.bytes_per_token() if hasattr(state, "bytes_per_token") else 0
    linear = getattr(state, "linear", state) if hasattr(state, "bytes_per_token") else state
    window = sum(_nbytes(t) for t in _window_parts(linear)) if linear is not None else 0
    total = sum(_nbytes(t) for t in state.tensors())
    return {
        "kind": "recurrent",
        "state_bytes": total - window - per_token * seen,
        "window_bytes": window,
        "bytes_per_token": per_token,
        "max_tokens": None,
    }


@torch.no_grad()
def cache_profile(model) -> list[dict]:
    """Per layer: {"kind", "state_bytes", "window_bytes", "bytes_per_token", "max_tokens"} (batch of one)."""
    device = next(model.parameters()).device
    ids = torch.full((1, 2), 5, dtype=torch.long, device=device)
    cache = _compat.output_cache(model(input_ids=ids, use_cache=True))
    rows = []
    for layer in cache.layers:
        if isinstance(layer, RecurrentLayer):
            rows.append(_recurrent_row(layer.state, ids.shape[1]))
            continue
        stored = layer.keys.shape[-2]
        per_token = (_nbytes(layer.keys) + _nbytes(layer.values)) // stored
        window = getattr(layer, "sliding_window", None)
        rows.append(
            {
                "kind": "sliding" if window else "softmax",
                "state_bytes": 0,
                "window_bytes": 0,
                "bytes_per_token": per_token,
                "max_tokens": window - 1 if window else None,
            }
        )
    return rows


def cache_bytes_at(profile: list[dict], tokens: int) -> dict:
    """Bytes of the cache after `tokens` tokens: total and split into linear state, window and key/value cache."""
    state = sum(r["state_bytes"] for r in profile)
    window = sum(r["window_bytes"] for r in profile)
    kv = 0
    for r in profile:
        kept = tokens if r["max_tokens"] is None else min(tokens, r["max_tokens"])
        kv += r["bytes_per_token"] * kept
    return {"total": state + window + kv, "state": state, "window": window, "kv": kv}


def describe(profile: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in profile:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    names = {"recurrent": "converted", "softmax": "softmax", "sliding": "sliding-window softmax"}
    return ", ".join(f"{n} {names[k]}" for k, n in counts.items())
