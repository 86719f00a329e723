"""Hedgehog feature-map linear attention with an optional exact-softmax sliding window (LoLCATs' hybrid).

`hybrid_attention` is the one entry point the attention modules call; `naive.py` is the ground truth. It runs the
Triton kernels (`triton_chunk.py` for training and prefill, `triton_recurrent.py` for one-token decoding steps) on
CUDA tensors and the chunked PyTorch path elsewhere. The environment variable `LINEARIZE_KERNELS` overrides the
choice: `torch`, `triton` (also on CPU, under `TRITON_INTERPRET=1`) or `auto` (the default). Triton is imported only
when a Triton path is taken, so that `TRITON_INTERPRET` can still be set before that. With a sparse cache beside the
window (LoLA), the modules call `sparse_hybrid_attention` instead (`sparse.py`, PyTorch on every device).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re

import torch

from ...errors import LinearizeError
from . import varlen
from .naive import hedgehog_feature_map, hybrid_attention_naive, hybrid_attention_weights
from .sparse import SparseState, sparse_hybrid_attention
from .sparse_naive import sparse_hybrid_attention_naive
from .torch_chunked import HybridState, hybrid_attention_chunked
from .varlen import hybrid_attention_varlen

logger = logging.getLogger(__name__)

ENV_VAR = "LINEARIZE_KERNELS"
# Longest window the Triton chunk kernel takes (its chunk length); kept here so dispatch needs no triton import.
TRITON_MAX_WINDOW = 64
# With LINEARIZE_SAVE_STATES=1 the Triton forward keeps its features and per-chunk states for the backward instead of
# the backward recomputing them: a faster backward (no second state pass, two feature launches fewer) for more
# memory held until the backward (4x the size of q at F = 64, D = Dv = 128: the features twice q, the states twice).
SAVE_STATES_ENV = "LINEARIZE_SAVE_STATES"
# Oldest Triton the kernels run on (the `gpu` extra's pin): under 3.0 and 3.1 they leave outputs unwritten.
TRITON_MIN = (3, 2)


def _triton(q, k, v, wq, wk, window_factor, window, scale, softcap=None, token_mask=None, initial_state=None,
            output_final_state=False, chunk_size=128, chunk_offsets=None):  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, wq, wk, window_factor)
    )
    if q.shape[1] == 1 and not needs_grad and chunk_offsets is None:
        from .triton_recurrent import hybrid_decode_triton

        out, state = hybrid_decode_triton(q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask,
                                          initial_state)  # fmt: skip
        return out, state if output_final_state else None
    from .triton_chunk import hybrid_attention_triton

    return hybrid_attention_triton(q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask, initial_state,
                                   output_final_state, chunk_size, chunk_offsets)  # fmt: skip


KERNELS = {"torch": hybrid_attention_chunked, "triton": _triton}


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None without one. Read from the package's metadata where there is
    any (`triton`, or `pytorch-triton` for PyTorch's nightly builds), so that Triton is not imported for it."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton"):
        try:
            text = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        import triton

        text = triton.__version__
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found[1]), int(found[2])) if found else None


def _version_text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


@functools.cache
def _warn_old_triton(version: tuple[int, int]) -> None:
    logger.warning(
        "Triton %s is older than %s, which the hybrid attention kernels need: running the PyTorch path instead "
        "(pip install 'triton>=%s,<4' for the kernels)",
        _version_text(version), _version_text(TRITON_MIN), _version_text(TRITON_MIN),
    )  # fmt: skip


def kernel_choice() -> str:
    """`LINEARIZE_KERNELS` checked: `auto`, `torch` or `triton`. Raises `LinearizeError`, saying what to do, for any
    other value and for `triton` without a Triton the kernels run on; the CLI checks it before any work starts."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in KERNELS:
        raise LinearizeError(f"{ENV_VAR}={name!r} is not one of {sorted([*KERNELS, 'auto'])}: set one, or unset it")
    if name == "triton":
        version = triton_version()
        if version is None:
            raise LinearizeError(
                f"{ENV_VAR}=triton but Triton is not installed: pip install 'linearize[gpu]', or unset {ENV_VAR}"
            )
        if version < TRITON_MIN:
            need = _version_text(TRITON_MIN)
            raise LinearizeError(
                f"{ENV_VAR}=triton needs Triton >= {need}, found {_version_text(version)}: pip install "
                f"'triton>={need},<4', or unset {ENV_VAR}"
            )
    return name


# Set by `keeping_states` for the calls made inside it; None defers to the environment variable.
_KEEP_STATES: contextvars.ContextVar[bool | None] = contextvars.ContextVar("linearize_keep_states", default=None)


@contextlib.contextmanager
def keeping_states(keep: bool = True):
    """Within the block, the Triton forward keeps (or, with `keep=False`, recomputes) its features and states for
    the backward whatever `LINEARIZE_SAVE_STATES` says: for callers that run each backward right after its forward,
    where keeping them costs one call's memory (attention transfer's layerwise mode)."""
    token = _KEEP_STATES.set(keep)
    try:
        yield
    finally:
        _KEEP_STATES.reset(token)


def save_states() -> bool:
    """Whether the Triton forward keeps its features and states for the backward: `keeping_states` where it is in
    force, else `LINEARIZE_SAVE_STATES` (default 0); raises `LinearizeError` for a value that is not 0 or 1."""
    kept = _KEEP_STATES.get()
    if kept is not None:
        return kept
    value = os.environ.get(SAVE_STATES_ENV, "0").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise LinearizeError(
        f"{SAVE_STATES_ENV}={value!r} is not 0 or 1: set 1 to keep the forward's features and states for the "
        "backward (faster, more memory), 0 to recompute them"
    )


def check_settings() -> None:
    """Checks the kernels' environment variables (`kernel_choice`, `save_states`), so that a bad value stops a run
    before it starts rather than at its first attention call."""
    kernel_choice()
    save_states()


def _auto_name(q: torch.Tensor, window: int) -> str:
    version = triton_version() if q.is_cuda else None
    if version is None:
        return "torch"
    if version < TRITON_MIN:
        _warn_old_triton(version)
        return "torch"
    if window > TRITON_MAX_WINDOW:
        logger.debug("window %d exceeds the Triton kernel's %d: using the PyTorch path", window, TRITON_MAX_WINDOW)
        return "torch"
    return "triton"


def kernel_name(q: torch.Tensor, window: int) -> str:
    """Which implementation `hybrid_attention` runs for these inputs (see `kernel_choice` for what it raises)."""
    name = kernel_choice()
    return _auto_name(q, window) if name == "auto" else name


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    window_factor: torch.Tensor | None,
    window: int,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    initial_state: HybridState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 128,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """Hybrid attention over a block of new tokens; same arguments and result as `hybrid_attention_chunked`.

    Args:
        q: `[B, T, H, D]` queries after RoPE.
        k: `[B, T, Hkv, D]` keys after RoPE.
        v: `[B, T, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights.
        window_factor: `[H]` logits of the window-term weight; ignored when `window == 0`.
        window: size of the exact-softmax window (current token included); 0 for plain linear attention.
        scale: softmax scale of the window scores.
        softcap: optional logit soft-cap of the window scores.
        token_mask: `[B, T]` bool, False for padding tokens.
        initial_state: state after the previous tokens; None starts from empty.
        output_final_state: return the state after these tokens.
        chunk_size: tokens per chunk of the PyTorch path (default 128); the Triton kernels use their own.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B must be 1, as in flash-attention's varlen
            API); each sequence attends only to itself, `initial_state` and the final state have batch N.

    Returns:
        `([B, T, H, Dv]` output in the dtype of `q`, final state or None).
    """
    name = kernel_name(q, window)
    impl = KERNELS[name]
    if cu_seqlens is not None:
        # The Triton kernels take the sequences in one row, each from a chunk boundary; the PyTorch path a padded
        # batch (`varlen.py`).
        return hybrid_attention_varlen(impl, q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask,
                                       initial_state, output_final_state, chunk_size, cu_seqlens=cu_seqlens,
                                       aligned=name == "triton" and varlen.ALIGNED)  # fmt: skip
    return impl(q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask, initial_state,
                output_final_state, chunk_size)  # fmt: skip


__all__ = [
    "HybridState",
    "SparseState",
    "check_settings",
    "hedgehog_feature_map",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_naive",
    "hybrid_attention_varlen",
    "hybrid_attention_weights",
    "kernel_choice",
    "keeping_states",
    "kernel_name",
    "save_states",
    "sparse_hybrid_attention",
    "sparse_hybrid_attention_naive",
    "triton_version",
]
