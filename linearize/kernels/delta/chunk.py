"""Chunked PyTorch path of the gated delta rule: training and prefill off-GPU.

Within a chunk of C tokens (G the log decays summed from the chunk's start, S the state the chunk starts from), the
state after token i is exp(G_i) S + sum_{j <= i} exp(G_i - G_j) k_j u_j^T, where the pseudo-values u_j satisfy

    u_j + beta_j sum_{m < j} exp(G_j - G_m) (k_j . k_m) u_m = beta_j (v_j - exp(G_j) S^T k_j)

a unit lower-triangular system (I + A) U = R, solved per chunk (the UT form of the WY representation that fla's
kernels build with `solve_tril`). Then O = (Q exp(G)) S + ((Q K^T) * D) U with D_ij = exp(G_i - G_j) for j <= i, and
the next state is exp(G_C) S + (K exp(G_C - G))^T U. Decays are differences of log sums taken before the
exponential, so no factor exceeds 1. Autograd runs through the triangular solves.
"""

from __future__ import annotations

import torch

from ..common import fp32_state, merge_chunks, split_chunks


def gated_delta_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over one batch of equal-length rows, all heads alike.

    Args:
        q, k: `[B, T, H, K]` (k l2-normalised by the caller when wanted).
        v: `[B, T, H, V]`.
        g: `[B, T, H]` log decays (<= 0).
        beta: `[B, T, H]` write strengths.
        scale: multiplies q.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.
        chunk_size: tokens per chunk (fla: 64); any value gives the same result up to rounding.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    B, T, H, K = q.shape
    C = chunk_size
    # [B, H, N, C, *] and [B, H, N, C]; the padding at the end has k = 0, g = 0 and beta = 0: it neither writes to
    # the state nor decays it.
    qf, kf, vf, gf, bf = split_chunks((q, k, v, g, beta), C)
    qf = qf * scale
    G = gf.cumsum(-1)
    idx = torch.arange(C, device=q.device)
    upto = idx[None, :] <= idx[:, None]
    before = idx[None, :] < idx[:, None]
    state = fp32_state(initial_state, B, H, K, v.shape[-1], q.device)
    outputs = []
    for n in range(qf.shape[2]):
        qn, kn, vn, Gn, bn = qf[:, :, n], kf[:, :, n], vf[:, :, n], G[:, :, n], bf[:, :, n]
        diff = Gn[..., :, None] - Gn[..., None, :]
        decay = torch.exp(diff.masked_fill(~upto, float("-inf")))
        lower = (bn[..., None] * decay * (kn @ kn.transpose(-1, -2))).masked_fill(~before, 0.0)
        eye = torch.eye(C, dtype=lower.dtype, device=lower.device)
        rhs = bn[..., None] * (vn - torch.exp(Gn)[..., None] * (kn @ state))
        u = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
        outputs.append((qn * torch.exp(Gn)[..., None]) @ state + ((qn @ kn.transpose(-1, -2)) * decay) @ u)
        last = Gn[..., -1:]
        state = torch.exp(last)[..., None] * state + (kn * torch.exp(last - Gn)[..., None]).transpose(-1, -2) @ u
    return merge_chunks(outputs, T), state if output_final_state else None
