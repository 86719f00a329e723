"""Gated linear attention (GLA): per-channel forget gates, optional normaliser, GQA, packed sequences.

`gated_linear_attention` is the entry point the gated kinds call; `naive.py` is the ground truth. On CUDA tensors
it runs fla's Triton kernels when `fla-core` is installed (`fla_path.py`); elsewhere the chunked PyTorch path
(`chunk.py`) for training and prefill and the step-by-step one (`recurrent.py`) for decoding. `LINEARIZE_KERNELS`
overrides the choice as for the hybrid op: `torch` forces PyTorch, `triton` requires fla.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...errors import LinearizeError
from ..common import torch_path
from ..hybrid import ENV_VAR, kernel_choice
from .chunk import gla_chunk_torch
from .fla_path import FLA_VERSIONS, fla_version, gla_fla
from .naive import EPS, expand_heads, gla_naive
from .recurrent import gla_recurrent_torch

logger = logging.getLogger(__name__)


def _torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    return torch_path(gla_recurrent_torch, gla_chunk_torch, (q, k, v, g), scale, initial_state, output_final_state,
                      cu_seqlens, chunk_size)  # fmt: skip


def _fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    return gla_fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


BACKENDS = {"torch": _torch, "fla": _fla}


@functools.cache
def _warn_no_fla() -> None:
    logger.warning(
        "fla-core is not installed: gated attention runs its PyTorch path on the GPU (pip install 'fla-core%s')",
        FLA_VERSIONS,
    )


def gla_backend(q: torch.Tensor) -> str:
    """Which path `gated_linear_attention` takes for `q`: `fla` or `torch`."""
    choice = kernel_choice()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if fla_version() is None:
            raise LinearizeError(
                f"{ENV_VAR}=triton but fla-core (the gated kinds' kernels) is not installed: "
                f"pip install 'fla-core{FLA_VERSIONS}', or unset {ENV_VAR}"
            )
        # fla's chunk kernels do not run under Triton's interpreter.
        if not q.is_cuda:
            raise LinearizeError(f"{ENV_VAR}=triton: fla's gated kernels need CUDA tensors; unset {ENV_VAR} on CPU")
        return "fla"
    if not q.is_cuda:
        return "torch"
    if fla_version() is None:
        _warn_no_fla()
        return "torch"
    return "fla"


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over a block of new tokens, continuing from `initial_state`.

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        g: `[B, T, Hg, K]` per-step log decays (<= 0), Hg = H or Hkv.
        scale: multiplies q; default `K ** -0.5`.
        normalize: divide by the gated key sum ("normalised GLA"; q and k should then be non-negative features);
            the state then has V + 1 columns, the last one the normaliser's.
        initial_state: `[N, H, K, V(+1)]` fp32 state before these tokens; None starts from zeros.
        output_final_state: return the state after these tokens.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each attends only to itself.
        token_mask: `[B, T]` bool, False for padding tokens, which neither enter the state nor decay it.
        chunk_size: tokens per chunk of the PyTorch path (default 32); fla uses its own.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V(+1)]` fp32 final state or None).
    """
    H, K = q.shape[2], q.shape[-1]
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {q.shape[0]}")
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    k, v, g = (expand_heads(x, H) for x in (k, v, g))
    g = g.float()
    if token_mask is not None:
        keep = token_mask[:, :, None, None]
        k, g = k * keep.to(k.dtype), g * keep.to(g.dtype)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o, state = BACKENDS[gla_backend(q)](q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    o = o.float()
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + EPS)
    return o.to(dtype), state


__all__ = ["BACKENDS", "gated_linear_attention", "gla_backend", "gla_chunk_torch", "gla_naive", "gla_recurrent_torch"]
