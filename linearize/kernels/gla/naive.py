"""Ground truth for gated linear attention (GLA): quadratic, in fp32, every term written out.

For one head, with per-channel log gates g_t <= 0 (a decay of exp(g_t) per step) and G_i = g_1 + ... + g_i:

    o_i = sum_{j <= i} sum_c q_ic k_jc exp(G_ic - G_jc) v_j  +  (q_i * exp(G_i)) S_0
    S_T = exp(G_T) * S_0 + sum_j (k_j * exp(G_T - G_j)) v_j^T                       (state [K, V])

q is multiplied by `scale` first. The normalised form ("normalised GLA") divides o_i by the same sum with v
replaced by 1; its state carries that key sum as one more column ([K, V + 1], the last column is the normaliser),
which is how every faster path computes it (v with a column of ones appended). Padding tokens (token mask False)
neither add to the state nor decay it. The faster paths (`chunk.py`, `recurrent.py`, fla's kernels) are tested
against this on outputs, final states and gradients.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, T, Hx, D]` -> `[B, T, heads, D]`, each of the Hx heads serving `heads // Hx` consecutive heads (GQA)."""
    if x.shape[2] == heads:
        return x
    if heads % x.shape[2]:
        raise ValueError(f"{heads} query heads cannot share {x.shape[2]} key/value/gate heads")
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def _one_sequence(q, k, v, g, normalize, initial_state):
    # q, k: [B, T, H, K] (q scaled), v: [B, T, H, V], g: [B, T, H, K] fp32; returns o [B, T, H, V] and the state
    # [B, H, K, V(+1)] in the type of q. The gate sums and decays are formed in fp32 whatever that type (a 16-bit
    # model keeps its gates in fp32 too), and the products in the type of q.
    B, T, H, K = q.shape
    ct = q.dtype
    G = g.float().cumsum(1)
    i = torch.arange(T, device=q.device)
    causal = (i[None, :] <= i[:, None])[None, None, :, :, None]
    # diff[b, h, i, j, c] = G_ic - G_jc, only where j <= i (elsewhere it would grow and overflow exp).
    diff = G.permute(0, 2, 1, 3)[:, :, :, None, :] - G.permute(0, 2, 1, 3)[:, :, None, :, :]
    decay = torch.exp(diff.masked_fill(~causal, float("-inf"))).to(ct)
    scores = torch.einsum("bihc,bjhc,bhijc->bhij", q, k, decay)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o = torch.einsum("bhij,bjhv->bihv", scores, v)
    if initial_state is not None:
        o = o + torch.einsum("bihc,bhcv->bihv", q * torch.exp(G).to(ct), initial_state)
    state = torch.einsum("bjhc,bjhv->bhcv", k * torch.exp(G[:, -1:] - G).to(ct), v)
    if initial_state is not None:
        state = state + torch.exp(G[:, -1]).to(ct)[..., None] * initial_state
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + EPS)
    return o, state


def gla_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic reference of gated linear attention.

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        g: `[B, T, Hg, K]` per-step log decays (<= 0), Hg = H or Hkv.
        scale: multiplies q; default `K ** -0.5`.
        normalize: divide by the gated key sum (then the state has V + 1 columns).
        initial_state: `[N, H, K, V(+1)]` state before these tokens (N = B, or the number of packed sequences).
        output_final_state: return the state after them.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each runs on its own.
        token_mask: `[B, T]` bool, False for padding tokens.
        upcast: compute in fp32 (fp64 for fp64 inputs: the reference); False computes in the type of v, as a
            16-bit model would: the baseline whose error a 16-bit kernel is held to (flash-attention's rule).

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V(+1)]` fp32 final state or None).
    """
    H, K = q.shape[2], q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    ct = torch.promote_types(torch.float32, v.dtype) if upcast else v.dtype
    qf = q.to(ct) * scale
    kf, vf = (expand_heads(x, H).to(ct) for x in (k, v))
    gf = expand_heads(g, H).to(torch.promote_types(torch.float32, ct))
    if token_mask is not None:
        keep = token_mask[:, :, None, None].to(kf.dtype)
        kf, gf = kf * keep, gf * keep
    s0 = initial_state.to(ct) if initial_state is not None else None
    if cu_seqlens is None:
        o, state = _one_sequence(qf, kf, vf, gf, normalize, s0)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            init = s0[n : n + 1] if s0 is not None else None
            o_n, s_n = _one_sequence(qf[:, a:b], kf[:, a:b], vf[:, a:b], gf[:, a:b], normalize, init)
            outs.append(o_n)
            states.append(s_n)
        o, state = torch.cat(outs, 1), torch.cat(states, 0)
    return o.to(v.dtype), state.float() if output_final_state else None
