"""Step-by-step PyTorch path of the RWKV-7 recurrence: decoding (one token at a time) off-GPU.

h_t = diag(exp w_t) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T and o_t = h_t^T (scale r_t), token by token; for T = 1
this is the whole decoding step. It carries the same [B, H, K, V] fp32 state as the chunked path and fla's kernels.
"""

from __future__ import annotations

import torch


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
    B, T, H, K = r.shape
    V = v.shape[-1]
    h = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    )
    outputs = []
    for t in range(T):
        at, bt = a[:, t].float(), b[:, t].float()
        h = torch.exp(w[:, t].float())[..., None] * h + bt[..., None] * torch.einsum("bhk,bhkv->bhv", at, h)[:, :, None]
        h = h + k[:, t].float()[..., None] * v[:, t].float()[:, :, None]
        outputs.append(torch.einsum("bhk,bhkv->bhv", r[:, t].float() * scale, h))
    o = torch.stack(outputs, 1) if outputs else r.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o, h if output_final_state else None
