"""Registry of attention kinds: a name, what it is, and how to build it around a softmax attention module.

Conversion looks kinds up here by name and never by string matching; an unknown name raises listing the valid
ones. A kind whose `build` is None keeps the original module (the `softmax` kind, for hybrid models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionKind:
    """One registered attention kind.

    Attributes:
        name: the name recipes use (`attention.kind`).
        description: one line for `linearize recipes` and reports.
        uses_window: whether `attention.window` applies.
        build: `(original_module, attention_config, layer_idx) -> new module`; None keeps the original.
    """

    name: str
    description: str
    uses_window: bool
    build: Callable[[nn.Module, object, int], nn.Module] | None


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind) -> AttentionKind:
    """Add `kind` to the registry; registering a name twice is an error."""
    if kind.name in ATTENTION_KINDS:
        raise ValueError(f"attention kind '{kind.name}' is already registered")
    ATTENTION_KINDS[kind.name] = kind
    return kind


def get_attention_kind(name: str) -> AttentionKind:
    """Look up a kind by name, raising with the list of valid names."""
    from ..errors import LinearizeError

    if name not in ATTENTION_KINDS:
        raise LinearizeError(f"attention kind '{name}' is unknown; choose one of: {', '.join(sorted(ATTENTION_KINDS))}")
    return ATTENTION_KINDS[name]
