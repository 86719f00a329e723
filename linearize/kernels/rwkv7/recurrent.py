"""Step-by-step PyTorch path of the RWKV-7 recurrence: decoding (one token at a time) off-GPU.

h_t = diag(exp w_t) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T and o_t = h_t^T (scale r_t), token by token; for T = 1
this is the whole decoding step. It carries the same [B, H, K, V] fp32 state as the chunked path and fla's kernels.
"""

from __future__ import annotations

import functools

import torch

from ..common import recurrent_scan


def _step(scale, h, rt, wt, kt, vt, at, bt):
    h = torch.exp(wt)[..., None] * h + bt[..., None] * torch.einsum("bhk,bhkv->bhv", at, h)[:, :, None]
    h = h + kt[..., None] * vt[:, :, None]
    return h, torch.einsum("bhk,bhkv->bhv", rt * scale, h)


def rwkv7_recurrent_torch(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RWKV-7 recurrence, one step per token; same arguments and result as `rwkv7_chunk_torch`."""
    step = functools.partial(_step, scale)
    return recurrent_scan(step, (r, w, k, v, a, b), v.shape[-1], initial_state, output_final_state)
