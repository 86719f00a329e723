"""Attention kinds that replace softmax attention, their shared pieces and the generation cache.

Every module of this package is imported here, so each kind file (hedgehog.py, lolcats.py, softmax.py, ...)
registers itself: a new kind is one new file.
"""

import importlib
import pkgutil

from .cache import LinearizeCache, RecurrentLayer
from .hybrid import TOKEN_MASK_KWARG, HybridLinearAttention
from .registry import (
    ATTENTION_KINDS,
    AttentionKind,
    Control,
    ConvertedAttention,
    converted_modules,
    get_attention_kind,
    kind_of,
    register_attention_kind,
    reset_missing_new_parameters,
)

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "ATTENTION_KINDS",
    "AttentionKind",
    "Control",
    "ConvertedAttention",
    "HybridLinearAttention",
    "LinearizeCache",
    "RecurrentLayer",
    "TOKEN_MASK_KWARG",
    "converted_modules",
    "get_attention_kind",
    "kind_of",
    "register_attention_kind",
    "reset_missing_new_parameters",
]
