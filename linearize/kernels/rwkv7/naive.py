"""Ground truth for the RWKV-7 recurrence (a diagonal-plus-low-rank transition): step by step, in fp32.

For one head, in fla's state layout (h is `[K, V]`; RWKV-7's papers write its transpose S = h^T):

    h_t = diag(exp(w_t)) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T,   o_t = h_t^T (scale r_t)
    (that is, S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T and o_t = S_t r_t)

w_t <= 0 is a per-channel log decay; RWKV-7 takes a = -kk and b = kk * iclr (kk the normalised key, iclr the
in-context learning rate), so that the transition removes part of what the state stored along kk before writing
v k^T. Padding tokens (token mask False) leave the state alone: their k, b and w count as zeros. The faster paths
(`chunk.py`, `recurrent.py`, fla's kernels) are tested against this on outputs, final states and gradients.
"""

from __future__ import annotations

import torch

from ..gla.naive import expand_heads


def _one_sequence(r, w, k, v, a, b, h):
    # r, w, k, a, b: [B, T, H, K]; v: [B, T, H, V]; h: [B, H, K, V], all in one compute type.
    outputs = []
    for t in range(r.shape[1]):
        removed = torch.einsum("bhk,bhkv->bhv", a[:, t], h)
        h = torch.exp(w[:, t])[..., None] * h + b[:, t, ..., None] * removed[:, :, None]
        h = h + k[:, t, ..., None] * v[:, t, :, None]
        outputs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], h))
    return torch.stack(outputs, 1), h


def rwkv7_naive(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step reference of the RWKV-7 recurrence.

    Args:
        r: `[B, T, H, K]` receptances (queries).
        w: `[B, T, H, K]` per-step log decays (<= 0).
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        a, b: `[B, T, H, K]` the low-rank part of the transition.
        scale: multiplies r (fla's `chunk_rwkv7` default: 1).
        initial_state: `[N, H, K, V]` state before these tokens (N = B, or the number of packed sequences).
        output_final_state: return the state after them.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each runs on its own.
        token_mask: `[B, T]` bool, False for padding tokens.
        upcast: compute in fp32 (fp64 for fp64 inputs); False computes in the type of v, as a 16-bit model would.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` fp32 final state or None).
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    ct = torch.promote_types(torch.float32, v.dtype) if upcast else v.dtype
    rf = r.to(ct) * scale
    kf, vf = (expand_heads(x, H).to(ct) for x in (k, v))
    wf, af, bf = (x.to(ct) for x in (w, a, b))
    if token_mask is not None:
        keep = token_mask[:, :, None, None].to(ct)
        kf, wf, bf = kf * keep, wf * keep, bf * keep
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = initial_state.to(ct) if initial_state is not None else torch.zeros(N, H, K, V, dtype=ct, device=r.device)
    if cu_seqlens is None:
        o, state = _one_sequence(rf, wf, kf, vf, af, bf, h0)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            parts = (x[:, s:e] for x in (rf, wf, kf, vf, af, bf))
            o_n, s_n = _one_sequence(*parts, h0[n : n + 1])
            outs.append(o_n)
            states.append(s_n)
        o, state = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(v.dtype), state.float() if output_final_state else None
