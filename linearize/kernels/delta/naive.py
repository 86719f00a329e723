"""Ground truth for the gated delta rule: the recurrence token by token, in fp32, with each transition written out.

For one head, with a per-step log decay g_t <= 0, a write strength beta_t in [0, 1] and the state S [K, V]:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = S_t^T (scale q_t)

The transition matrix (I - beta_t k_t k_t^T) is formed as a [K, K] matrix and multiplied in, on purpose: the faster
paths use the rank-one update S += k (beta (v - S^T k))^T (`recurrent.py`) or its chunked UT form (`chunk.py`), so
this file shares no algebra with them. The state layout is fla's default ([K, V], `state_v_first=False`). Padding
tokens (token mask False) have k = 0 and g = 0: they leave the state as it was. With `qk_l2norm`, q and k are divided
by sqrt(sum x^2 + 1e-6) first, as fla's `use_qk_l2norm_in_kernel` does; the rule is stable for beta ||k||^2 <= 2.
"""

from __future__ import annotations

import torch

from ..gla.naive import expand_heads

# fla's l2norm epsilon (under the square root).
L2_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dimension, in the type of x."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def _one_sequence(q, k, v, g, beta, state):
    # q, k: [B, T, H, K] (q scaled), v: [B, T, H, V], g, beta: [B, T, H]; state [B, H, K, V]; all in one type.
    B, T, H, K = q.shape
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = torch.exp(g[:, t])[..., None, None] * (eye - bt * kt[..., :, None] * kt[..., None, :])
        state = transition @ state + bt * kt[..., :, None] * v[:, t, :, None, :]
        outs.append((q[:, t, :, :, None] * state).sum(-2))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o, state


def gated_delta_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step reference of the gated delta rule.

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        g: `[B, T, Hg]` per-step log decays (<= 0), one per head; Hg = H or Hkv.
        beta: `[B, T, Hg]` write strengths.
        scale: multiplies q (after the l2 norm); default `K ** -0.5`.
        initial_state: `[N, H, K, V]` state before these tokens (N = B, or the number of packed sequences).
        output_final_state: return the state after them.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each runs on its own.
        token_mask: `[B, T]` bool, False for padding tokens.
        qk_l2norm: l2-normalise q and k over their last dimension first.
        upcast: compute in fp32 (fp64 for fp64 inputs: the reference); False computes in the type of v, as a
            16-bit model would (the baseline whose error a 16-bit kernel is held to).

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` fp32 final state or None).
    """
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    ct = torch.promote_types(torch.float32, v.dtype) if upcast else v.dtype
    qf, kf = q.to(ct), expand_heads(k, H).to(ct)
    if qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * scale
    vf = expand_heads(v, H).to(ct)
    gf, bf = (expand_heads(x[..., None], H)[..., 0].to(ct) for x in (g, beta))
    if token_mask is not None:
        keep = token_mask[:, :, None].to(ct)
        kf, gf = kf * keep[..., None], gf * keep
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, T]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = slice(n, n + 1) if cu_seqlens is not None else slice(None)
        s0 = (
            initial_state[rows].to(ct)
            if initial_state is not None
            else torch.zeros(qf.shape[0], H, K, vf.shape[-1], dtype=ct, device=q.device)
        )
        o_n, s_n = _one_sequence(qf[:, a:b], kf[:, a:b], vf[:, a:b], gf[:, a:b], bf[:, a:b], s0)
        outs.append(o_n)
        states.append(s_n)
    o, state = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(v.dtype), state.float() if output_final_state else None
