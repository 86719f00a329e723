"""Registry of attention kinds and the contract every converted attention module follows.

A kind is one file under `linearize/attention/` that builds its module and calls `register_attention_kind`; the
package imports every such file, so adding a kind needs no edit elsewhere. Conversion, training, the generation
cache, export and the evaluation controls ask the registered kind (and the `ConvertedAttention` it builds) and
never test for a particular module class. An unknown name raises listing the valid ones. A kind whose `build` is
None keeps the original module (the `softmax` kind, for hybrid models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _compat

# The attribute `swap_attention` sets on every module it builds, naming the kind that built it.
KIND_ATTR = "linearize_kind"
TOKEN_MASK_KWARG = "linearize_token_mask"
# The offsets of packed sequences, under the name transformers gives them for flash attention.
PACKED_KWARG = "cu_seq_lens_q"


class ConvertedAttention(nn.Module):
    """Base of the modules that kinds build around a teacher's softmax attention module.

    The teacher's children (projections, q/k norms) are adopted under their own names, so teacher checkpoints load
    strictly and LoRA targets still match; every parameter outside them is new (`named_new_parameters`), which is
    what attention transfer trains and what a teacher checkpoint lacks.

    Subclasses implement `attention_heads` (the per-head output before `o_proj`, what transfer matches),
    `reset_new_parameters` (the start from the teacher, also run after loading weights that lack the new
    parameters) and `forward` (the transformers attention call, returning `(output, None)`).

    Args:
        original: the softmax attention module being replaced.
        layer_idx: index of the decoder layer.
    """

    def __init__(self, original: nn.Module, layer_idx: int):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.adopted = frozenset(name for name, _ in original.named_children())
        self.layer_idx = layer_idx

    def named_new_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters conversion added, by name relative to this module (adapters wrapped around adopted
        projections belong to those projections, not here)."""
        return {n: p for n, p in self.named_parameters() if n.split(".", 1)[0] not in self.adopted}

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.named_new_parameters().values())

    def reset_new_parameters(self, names: Iterable[str] | None = None) -> None:
        """Give the new parameters in `names` (all when None) their start; adopted weights are already loaded."""
        raise NotImplementedError

    def float_new_parameters(self) -> None:
        """Keep the new parameters in fp32: they are trained, and a bf16 copy would lose small updates."""
        for p in self.new_parameters():
            p.data = p.data.float()

    def attention_heads(
        self, hidden_states: torch.Tensor, position_embeddings, token_mask=None, cache=None, cu_seqlens=None
    ) -> torch.Tensor:
        """Per-head attention output before `o_proj`: `[B, T, hidden]` -> `[B, T, H * Dv]`."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        """Same call and return convention as the transformers attention modules: `(output, None)`."""
        cache = _compat.pop_cache(kwargs)
        # Packed sequences (transformers' flash-attention kwargs, e.g. from DataCollatorWithFlattening) stay apart.
        cu_seqlens = kwargs.get(PACKED_KWARG)
        if cu_seqlens is not None and cache is not None:
            raise ValueError(f"{PACKED_KWARG} (packed sequences) cannot be combined with a cache; pass use_cache=False")
        heads = self.attention_heads(
            hidden_states, position_embeddings, kwargs.get(TOKEN_MASK_KWARG), cache, cu_seqlens=cu_seqlens
        )
        return self.o_proj(heads), None


@dataclass(frozen=True)
class Control:
    """An evaluation control: a variant of a kind with one branch switched off.

    Attributes:
        description: one line for the report.
        applies: `module -> bool`, whether this module has the branch (e.g. a window of at least one token).
        switch: `module -> restore`, switches the branch off and returns a function that switches it back on.
    """

    description: str
    applies: Callable[[nn.Module], bool]
    switch: Callable[[nn.Module], Callable[[], None]]


@dataclass(frozen=True)
class AttentionKind:
    """One registered attention kind.

    Attributes:
        name: the name recipes use (`attention.kind`).
        description: one line for `linearize recipes` and reports.
        uses_window: whether `attention.window` applies.
        build: `(original_module, attention_config, layer_idx) -> ConvertedAttention`; None keeps the original.
        cache_layer: `() -> cache layer` holding one converted layer's decoding state (a transformers
            `CacheLayerMixin`, e.g. `RecurrentLayer`); None keeps the usual key/value cache.
        ops: the ops the module calls, by name (for tests and compile checks).
        controls: evaluation controls by name (`window-only`, `linear-only`), for kinds with several branches.
        options: dataclass of kind-specific settings read from `attention.options`; None when there are none.
        state_bytes: `(model_config, attention_config, layer_idx, tokens, batch, dtype_bytes) -> int`, the bytes
            its cache layer holds after `tokens` tokens (what `cache_bytes_at` reports); None when not declared.
        sparse_cache: whether the kind takes `attention.sparse_cache` (exact past pairs beside its window).
        softmax_heads: whether the kind keeps `attention.softmax_heads` exact inside a layer (heads.py).
    """

    name: str
    description: str
    uses_window: bool
    build: Callable[[nn.Module, object, int], ConvertedAttention] | None
    cache_layer: Callable[[], object] | None = None
    ops: dict[str, Callable] = field(default_factory=dict)
    controls: dict[str, Control] = field(default_factory=dict)
    options: type | None = None
    state_bytes: Callable[..., int] | None = None
    sparse_cache: bool = False
    softmax_heads: bool = False


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind) -> AttentionKind:
    """Add `kind` to the registry; registering a name twice is an error."""
    if kind.name in ATTENTION_KINDS:
        raise ValueError(f"attention kind '{kind.name}' is already registered")
    if kind.build is not None and kind.cache_layer is None:
        raise ValueError(f"attention kind '{kind.name}' builds a module but declares no cache_layer")
    ATTENTION_KINDS[kind.name] = kind
    return kind


def get_attention_kind(name: str) -> AttentionKind:
    """Look up a kind by name, raising with the list of valid names."""
    from ..errors import LinearizeError

    if name not in ATTENTION_KINDS:
        raise LinearizeError(f"attention kind '{name}' is unknown; choose one of: {', '.join(sorted(ATTENTION_KINDS))}")
    return ATTENTION_KINDS[name]


def kinds_with(capability: str) -> list[str]:
    """Names of the registered kinds whose `AttentionKind` flag `capability` is set (e.g. "softmax_heads")."""
    return sorted(name for name, kind in ATTENTION_KINDS.items() if getattr(kind, capability))


def converted_modules(model: nn.Module) -> dict[int, ConvertedAttention]:
    """The converted attention modules of `model` by layer index (whatever wraps them, e.g. peft)."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, ConvertedAttention)}


def kind_of(module: nn.Module) -> AttentionKind:
    """The kind that built a converted module."""
    return get_attention_kind(getattr(module, KIND_ATTR))


def reset_missing_new_parameters(model: nn.Module, missing: Iterable[str]) -> None:
    """After loading weights: give every new parameter the checkpoint lacked its start (`missing` holds full
    parameter names, as transformers reports them)."""
    missing = set(missing)
    for prefix, module in model.named_modules():
        if not isinstance(module, ConvertedAttention):
            continue
        lead = f"{prefix}." if prefix else ""
        names = [n for n in module.named_new_parameters() if lead + n in missing]
        if names:
            module.reset_new_parameters(names)
