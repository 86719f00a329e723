"""Step-by-step PyTorch path of gated linear attention: decoding (one token at a time) off-GPU.

S_t = exp(g_t) * S_{t-1} + k_t v_t^T and o_t = (scale q_t) S_t, token by token; for T = 1 this is the whole
decoding step. It carries the same [B, H, K, V] fp32 state as the chunked path and fla's kernels.
"""

from __future__ import annotations

import torch


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
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    )
    outputs = []
    for t in range(T):
        kt, vt = k[:, t].float(), v[:, t].float()
        state = torch.exp(g[:, t].float())[..., None] * state + kt[..., None] * vt[..., None, :]
        outputs.append(torch.einsum("bhc,bhcv->bhv", q[:, t].float() * scale, state))
    o = torch.stack(outputs, 1) if outputs else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o, state if output_final_state else None
