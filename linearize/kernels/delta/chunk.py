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
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    n_chunks = (T + pad) // C
    # Padding at the end has k = 0, g = 0 and beta = 0: it neither writes to the state nor decays it.
    qf, kf, vf = (torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    gf, bf = (torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) for x in (g, beta))
    # [B, H, N, C, *] and [B, H, N, C]
    qf, kf, vf = (x.view(B, n_chunks, C, H, -1).permute(0, 3, 1, 2, 4) for x in (qf, kf, vf))
    gf, bf = (x.view(B, n_chunks, C, H).permute(0, 3, 1, 2) for x in (gf, bf))
    qf = qf * scale
    G = gf.cumsum(-1)
    idx = torch.arange(C, device=q.device)
    upto = idx[None, :] <= idx[:, None]
    before = idx[None, :] < idx[:, None]
    state = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    )
    outputs = []
    for n in range(n_chunks):
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
    o = torch.stack(outputs, 2).permute(0, 2, 3, 1, 4).reshape(B, n_chunks * C, H, V)[:, :T]
    return o, state if output_final_state else None
