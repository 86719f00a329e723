"""The RWKV-7 recurrence (diagonal-plus-low-rank transition): GQA, padding, packed sequences, decoding.

`rwkv7_attention` is the entry point the `rwkv7` kind calls; `naive.py` is the ground truth. On CUDA tensors it
runs fla's Triton kernels when `fla-core` is installed (`fla_path.py`); elsewhere the chunked PyTorch path
(`chunk.py`) for training and prefill and the step-by-step one (`recurrent.py`) for decoding. `LINEARIZE_KERNELS`
overrides the choice as for the other ops: `torch` forces PyTorch, `triton` requires fla.
"""

from __future__ import annotations

import torch

from ..common import torch_path
from ..gla import gla_backend
from ..gla.naive import expand_heads
from .chunk import rwkv7_chunk_torch
from .fla_path import rwkv7_fla
from .naive import rwkv7_naive
from .recurrent import rwkv7_recurrent_torch


def _torch(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    return torch_path(rwkv7_recurrent_torch, rwkv7_chunk_torch, (r, w, k, v, a, b), scale, initial_state,
                      output_final_state, cu_seqlens, chunk_size)  # fmt: skip


def _fla(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    return rwkv7_fla(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)


BACKENDS = {"torch": _torch, "fla": _fla}


def rwkv7_attention(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RWKV-7 recurrence over a block of new tokens, continuing from `initial_state` (see naive.py).

    Args:
        r: `[B, T, H, K]` receptances (queries).
        w: `[B, T, H, K]` per-step log decays (<= 0).
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        a, b: `[B, T, H, K]` the transition's low-rank part (RWKV-7: a = -kk, b = kk * iclr).
        scale: multiplies r (default 1, as fla's `chunk_rwkv7`).
        initial_state: `[N, H, K, V]` fp32 state before these tokens; None starts from zeros.
        output_final_state: return the state after these tokens.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each runs from its own state.
        token_mask: `[B, T]` bool, False for padding tokens, which leave the state alone.
        chunk_size: tokens per chunk of the PyTorch path; fla uses its own.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` fp32 final state or None).
    """
    H = r.shape[2]
    if cu_seqlens is not None and r.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {r.shape[0]}")
    dtype = v.dtype
    k, v = expand_heads(k, H), expand_heads(v, H)
    w = w.float()
    if token_mask is not None:
        keep = token_mask[:, :, None, None]
        k, w, b = k * keep.to(k.dtype), w * keep.to(w.dtype), b * keep.to(b.dtype)
    o, state = BACKENDS[gla_backend(r)](
        r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, chunk_size
    )
    return o.to(dtype), state


__all__ = ["BACKENDS", "rwkv7_attention", "rwkv7_chunk_torch", "rwkv7_naive", "rwkv7_recurrent_torch"]
