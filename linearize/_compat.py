"""Differences between transformers 5.x releases, kept in one place.

transformers renamed the cache argument of model and attention forwards from `past_key_values` to `cache`
(5.2x); both spellings are accepted here and the one the installed release uses is passed on.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
CACHE_KWARGS = ("cache", "past_key_values")


def pop_cache(kwargs: dict):
    """Remove and return the cache from forward kwargs, whichever name the caller used."""
    found = None
    for name in CACHE_KWARGS:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def output_cache(outputs):
    """The cache a model output carries, under either field name."""
    for name in CACHE_KWARGS:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def set_output_cache(outputs, cache) -> None:
    """Store `cache` on a model output under the installed release's field name."""
    for name in CACHE_KWARGS:
        if name in outputs.__dataclass_fields__:
            outputs[name] = cache
            return
