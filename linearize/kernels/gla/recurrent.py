"""Step-by-step PyTorch path of gated linear attention: decoding (one token at a time) off-GPU.

S_t = exp(g_t) * S_{t-1} + k_t v_t^T and o_t = (scale q_t) S_t, token by token; for T = 1 this is the whole
decoding step. It carries the same [B, H, K, V] fp32 state as the chunked path and fla's kernels.
"""

from __future__ import annotations

import functools

import torch

from ..common import recurrent_scan


def _step(scale, state, qt, kt, vt, gt):
    state = torch.exp(gt)[..., None] * state + kt[..., None] * vt[..., None, :]
    return state, torch.einsum("bhc,bhcv->bhv", qt * scale, state)


def gla_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, one step per token; same arguments and result as `gla_chunk_torch`.

    Args:
        q, k: `[B, T, H, K]`.
        v: `[B, T, H, V]`.
        g: `[B, T, H, K]` log decays (<= 0).
        scale: multiplies q.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    step = functools.partial(_step, scale)
    return recurrent_scan(step, (q, k, v, g), v.shape[-1], initial_state, output_final_state)
