"""Switch the sparse cache (LoLA) on or off in a loaded model, without retraining.

The cache adds no parameters: the kept pairs are chosen by the linear state's recall error at run time, so an
evaluation can try it on any trained student of a kind that takes it (`AttentionKind.sparse_cache`). The modules
get the new sizes and the model's conversion settings record them, so that a save writes them into config.json and
a reload builds the same op. A student trained with a learned scorer (`attention.sparse_scorer: learned`) keeps it:
the evaluation can change its K, not remove it.
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import LinearizeError
from .eviction import MARGIN
from .registry import ATTENTION_KINDS, converted_modules, kind_of, kinds_with

SCORERS = ("recall", "learned")

logger = logging.getLogger(__name__)


def takes_sparse_cache(model: nn.Module) -> bool:
    """Whether any converted layer of `model` is of a kind that takes a sparse cache and has a window."""
    return any(kind_of(m).sparse_cache and m.window > 0 for m in converted_modules(model).values())


def check_sizes(cache, block, names: tuple[str, str] = ("attention.sparse_cache", "attention.sparse_block")) -> None:
    """One-line errors (`LinearizeError`) for sizes that are not counts; `names` are what they call the settings."""
    if type(cache) is not int or cache < 0:
        raise LinearizeError(f"{names[0]} must be an integer >= 0 (pairs kept per kv head), got {cache!r}")
    if block is not None and (type(block) is not int or block < 1):
        raise LinearizeError(f"{names[1]} must be an integer >= 1 or unset (the window), got {block!r}")


def check_sparse_cache(kind: str, window: int, cache, block, scorer: str = "recall") -> None:
    """The attention settings' check: counts, and a cache only for a kind that takes it, with a window; a learned
    scorer only with a cache and a window wider than the scorer's reach."""
    check_sizes(cache, block)
    if scorer not in SCORERS:
        raise LinearizeError(f"attention.sparse_scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if scorer == "learned" and not cache:
        raise LinearizeError("attention.sparse_scorer=learned needs a sparse cache: set attention.sparse_cache >= 1")
    if scorer == "learned" and window <= MARGIN:
        raise LinearizeError(
            f"attention.sparse_scorer=learned scores each token from {MARGIN} neighbours on each side, which must "
            f"have been seen when it leaves the window: set attention.window >= {MARGIN + 1}, got {window}"
        )
    if not cache:
        return
    if not ATTENTION_KINDS[kind].sparse_cache:
        raise LinearizeError(
            f"attention.sparse_cache needs a kind with a window: '{kind}' has none; kinds that take it: "
            f"{', '.join(kinds_with('sparse_cache'))}"
        )
    if window < 1:
        raise LinearizeError(f"attention.sparse_cache needs attention.window >= 1, got {window}")


def set_sparse_cache(model: nn.Module, cache_size: int, block: int | None = None, name: str = "the model") -> int:
    """Give every converted layer that takes it a sparse cache of `cache_size` pairs per key/value head, updated
    every `block` tokens (None: the window); `cache_size` 0 switches it off. Returns the layers changed.

    Raises `LinearizeError` for sizes that are not counts and for a model with no layer that takes the cache.
    """
    check_sizes(cache_size, block, ("--sparse-cache", "--sparse-block"))
    if cache_size and not takes_sparse_cache(model):
        kinds = sorted({kind_of(m).name for m in converted_modules(model).values()}) or ["none converted"]
        raise LinearizeError(
            f"{name} has attention {', '.join(kinds)}, which takes no sparse cache; kinds that take it (with a "
            f"window >= 1): {', '.join(kinds_with('sparse_cache'))}"
        )
    if not cache_size and any(getattr(m, "token_scorer", None) is not None for m in converted_modules(model).values()):
        raise LinearizeError(
            f"{name} was trained with a learned sparse cache (attention.sparse_scorer=learned), which --sparse-cache "
            "can resize but not remove: pass K >= 1"
        )
    changed = 0
    for module in converted_modules(model).values():
        if kind_of(module).sparse_cache and module.window > 0:
            module.sparse_cache, module.sparse_block = cache_size, block
            changed += 1
    settings = getattr(model.config, "linearize", None)
    if settings and "attention" in settings:
        attention = settings["attention"]
        attention["sparse_cache"], attention["sparse_block"] = cache_size, block
    logger.info("%s: sparse cache of %d pairs per kv head in %d layers", name, cache_size, changed)
    return changed
