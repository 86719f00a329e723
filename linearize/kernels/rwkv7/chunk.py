"""Chunked PyTorch path of the RWKV-7 recurrence: training and prefill off-GPU, exact (no approximation).

Within a chunk of C tokens, with G_i the log decays summed from the chunk's start and h_0 the state entering it,
the state's read-outs u_i = h_{i-1}^T a_i (what the low-rank part removes) solve a unit lower-triangular system

    u_i = (a_i * exp(G_{i-1}))^T h_0 + sum_{j<i} [(a_i * exp(G_{i-1} - G_j)) . k_j] v_j + [(a_i * ...) . b_j] u_j,

after which the chunk is plain gated linear attention with the values v_j on keys k_j and the values u_j on keys
b_j: o_i = (r_i * exp(G_i))^T h_0 + sum_{j<=i} [(r_i * exp(G_i - G_j)) . k_j] v_j + [(r_i * ...) . b_j] u_j, and
the state leaving it is exp(G_C) * h_0 + sum_j (k_j * exp(G_C - G_j)) v_j^T + (b_j * exp(G_C - G_j)) u_j^T.
The triangular solve is autograd's, so every gradient is exact. Where a chunk's total log decay stays above
-MAX_FACTORED_DECAY (always, for RWKV-7's decays of at least exp(-0.61) per step and chunks of up to 32 tokens),
exp(G_i - G_j) is split into exp(G_i) exp(-G_j) and the four score matrices are plain matrix products; stronger
decays would overflow that split, and those chunks take the differences before the exponential instead ([C, C, K]
decays per chunk, recomputed in the backward rather than kept), so no factor exceeds 1.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..common import fp32_state, merge_chunks, split_chunks

# Largest chunk total of log decays (in magnitude) for which exp(G_i) and exp(-G_j) are formed apart: e^30 = 1e13
# leaves fp32 ample room above any product of them and the inputs.
MAX_FACTORED_DECAY = 30.0


def _intra(r, k, a, b, G, w, later, strictly_later):
    # [B, H, C, C] score matrices of one chunk; the decays are differences of log sums taken before exp.
    Gb = G[:, :, :, None, :]
    decay = torch.exp((Gb - G[:, :, None, :, :]).masked_fill(later, float("-inf")))
    # G_{i-1} - G_j for j < i: the low-rank read-out of token i sees the state before token i's decay.
    decay_before = torch.exp(
        (Gb - w[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(strictly_later, float("-inf"))
    )
    return (
        torch.einsum("bhic,bhjc,bhijc->bhij", r, k, decay),
        torch.einsum("bhic,bhjc,bhijc->bhij", r, b, decay),
        torch.einsum("bhic,bhjc,bhijc->bhij", a, k, decay_before),
        torch.einsum("bhic,bhjc,bhijc->bhij", a, b, decay_before),
    )


def _intra_factored(r, k, a, b, G, w, later, strictly_later):
    # The same matrices as `_intra`, for chunks whose decays are weak enough to split.
    rq, ad = r * torch.exp(G), a * torch.exp(G - w)
    kd, bd = (k * torch.exp(-G)).transpose(-1, -2), (b * torch.exp(-G)).transpose(-1, -2)
    later, strictly_later = later[..., 0], strictly_later[..., 0]
    return (
        (rq @ kd).masked_fill(later, 0.0),
        (rq @ bd).masked_fill(later, 0.0),
        (ad @ kd).masked_fill(strictly_later, 0.0),
        (ad @ bd).masked_fill(strictly_later, 0.0),
    )


def rwkv7_chunk_torch(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RWKV-7 recurrence of one batch of equal-length rows, all heads alike.

    Args:
        r, w, k, a, b: `[B, T, H, K]` (w: log decays <= 0).
        v: `[B, T, H, V]`.
        scale: multiplies r.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.
        chunk_size: tokens per chunk (default 32); any value gives the same result up to rounding.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    B, T, H, K = r.shape
    # [B, H, N, C, *]; the padding at the end has k = b = w = 0: it leaves the state alone.
    rf, wf, kf, vf, af, bf = split_chunks((r, w, k, v, a, b), chunk_size)
    rf = rf * scale
    G = wf.cumsum(3)
    idx = torch.arange(chunk_size, device=r.device)
    later = (idx[None, :] > idx[:, None])[:, :, None]
    strictly_later = (idx[None, :] >= idx[:, None])[:, :, None]
    eye = torch.eye(chunk_size, device=r.device)
    h = fp32_state(initial_state, B, H, K, v.shape[-1], r.device)
    outputs = []
    # Which chunks may split their decays, read in one go (one device sync on a GPU, not one per chunk).
    factored = (G[:, :, :, -1].amin(dim=(0, 1, 3)) > -MAX_FACTORED_DECAY).tolist()
    for n in range(rf.shape[2]):
        rn, wn, kn, vn, an, bn, Gn = (x[:, :, n] for x in (rf, wf, kf, vf, af, bf, G))
        args = (rn, kn, an, bn, Gn, wn, later, strictly_later)
        if factored[n]:
            A_rk, A_rb, A_ak, A_ab = _intra_factored(*args)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (rn, kn, an, bn, Gn)):
            A_rk, A_rb, A_ak, A_ab = checkpoint(_intra, *args, use_reentrant=False)
        else:
            A_rk, A_rb, A_ak, A_ab = _intra(*args)
        rhs = (an * torch.exp(Gn - wn)) @ h + A_ak @ vn
        u = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
        outputs.append((rn * torch.exp(Gn)) @ h + A_rk @ vn + A_rb @ u)
        last = Gn[:, :, -1:]
        tail = torch.exp(last - Gn)
        h = (
            torch.exp(last).transpose(-1, -2) * h
            + (kn * tail).transpose(-1, -2) @ vn
            + (bn * tail).transpose(-1, -2) @ u
        )
    return merge_chunks(outputs, T), h if output_final_state else None
