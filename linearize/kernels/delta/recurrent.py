"""Step-by-step PyTorch path of the gated delta rule: decoding (one token at a time) off-GPU.

Per token, as fla's recurrent kernel: decay the state (S <- exp(g_t) S), read what it holds for the key
(S^T k_t), write the correction u_t = beta_t (v_t - S^T k_t) along k_t (S <- S + k_t u_t^T), then o_t = S^T (scale
q_t). It carries the same [B, H, K, V] fp32 state as the chunked path and fla's kernels.
"""

from __future__ import annotations

import functools

import torch

from ..common import recurrent_scan


def _step(scale, state, qt, kt, vt, gt, bt):
    state = torch.exp(gt)[..., None, None] * state
    u = bt[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, state))
    state = state + kt[..., :, None] * u[..., None, :]
    return state, torch.einsum("bhk,bhkv->bhv", qt * scale, state)


def gated_delta_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule, one step per token; same arguments and result as `gated_delta_chunk_torch`.

    Args:
        q, k: `[B, T, H, K]`.
        v: `[B, T, H, V]`.
        g: `[B, T, H]` log decays (<= 0).
        beta: `[B, T, H]` write strengths.
        scale: multiplies q.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    step = functools.partial(_step, scale)
    return recurrent_scan(step, (q, k, v, g, beta), v.shape[-1], initial_state, output_final_state)
