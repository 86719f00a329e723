"""Chunked PyTorch path of gated linear attention: training and prefill off-GPU.

Tokens go in chunks of C. Within a chunk the gates are summed from the chunk's start (G), and the scores use
exp(G_i - G_j) for j <= i, formed as a difference of log decays before the exponential, as fla does, so no factor
ever exceeds 1 however strong the gates; across chunks a [K, V] state is carried, decayed by the chunk's total
gate. The intra-chunk decays ([C, C, K] per chunk) are recomputed in the backward rather than kept, so what
training holds is O(T * (C + K)) per head, as for ungated linear attention.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..common import fp32_state, merge_chunks, split_chunks


def _intra_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    # [B, H, C, C]: sum_c q_ic k_jc exp(G_ic - G_jc) for j <= i; the difference is taken before the exponential.
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]
    decay = torch.exp(diff.masked_fill(later, float("-inf")))
    return torch.einsum("bhic,bhjc,bhijc->bhij", q, k, decay)


def gla_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention of one batch of equal-length rows, all heads alike.

    Args:
        q, k: `[B, T, H, K]`.
        v: `[B, T, H, V]`.
        g: `[B, T, H, K]` log decays (<= 0).
        scale: multiplies q.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.
        chunk_size: tokens per chunk (default 32); any value gives the same result up to rounding.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    B, T, H, K = q.shape
    # [B, H, N, C, *]; the padding at the end has k = 0 and g = 0: it neither adds to the state nor decays it.
    qf, kf, vf, gf = split_chunks((q, k, v, g), chunk_size)
    qf = qf * scale
    G = gf.cumsum(3)
    idx = torch.arange(chunk_size, device=q.device)
    later = (idx[None, :] > idx[:, None])[:, :, None]
    state = fp32_state(initial_state, B, H, K, v.shape[-1], q.device)
    outputs = []
    for n in range(qf.shape[2]):
        qn, kn, vn, Gn = qf[:, :, n], kf[:, :, n], vf[:, :, n], G[:, :, n]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (qn, kn, Gn)):
            scores = checkpoint(_intra_scores, qn, kn, Gn, later, use_reentrant=False)
        else:
            scores = _intra_scores(qn, kn, Gn, later)
        out = scores @ vn + (qn * torch.exp(Gn)) @ state
        outputs.append(out)
        last = Gn[:, :, -1:]
        state = torch.exp(last).transpose(-1, -2) * state + (kn * torch.exp(last - Gn)).transpose(-1, -2) @ vn
    return merge_chunks(outputs, T), state if output_final_state else None
