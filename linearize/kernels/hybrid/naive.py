"""Ground truth for the hedgehog / sliding-window hybrid attention op.

Materialises the full [T, T] score matrices in fp32. It is slow and memory hungry on purpose: every faster
path (the chunked PyTorch path, the Triton kernels) is tested against it on outputs, states and gradients.

The op, for query i and keys j <= i of one head (LoLCATs' design):

    window term  a_ij = g * exp(s_ij - m_i)      for i - W < j <= i,  s_ij = scale * q_i . k_j (soft-capped),
                                                  m_i = max of s_ij over that window
    linear term  l_ij = phi_q(q_i) . phi_k(k_j)  for j <= i - W
    y_i = (sum_j a_ij v_j + sum_j l_ij v_j) / (sum_j a_ij + sum_j l_ij + eps)

with g = sigmoid(window_factor) per head, phi(x) = [softmax(x W), softmax(-x W)] (the Hedgehog feature map)
and W = 0 meaning plain normalised linear attention. Keys whose token mask is False take part in nothing.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hedgehog feature map, per head.

    Args:
        x: `[B, T, H, D]`.
        weight: `[H, D, F]`.
        dtype: type the projection and the softmax are computed and returned in (default fp32).

    Returns:
        `[B, T, H, 2F]`: `cat(softmax(x W), softmax(-x W))` over the feature dimension.
    """
    proj = torch.einsum("bthd,hdf->bthf", x.to(dtype), weight.to(dtype))
    return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, T, Hkv, D]` -> `[B, T, Hkv * groups, D]`, each kv head serving `groups` consecutive query heads."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=2)


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style logit soft-capping: `c * tanh(s / c)`; identity when `softcap` is None or 0."""
    if not softcap:
        return scores
    return softcap * torch.tanh(scores / softcap)


def hybrid_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    window_factor: torch.Tensor | None,
    window: int,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Normalised attention weights `[B, H, T, T]` of the hybrid op (rows sum to 1 up to eps); see
    `hybrid_attention_naive` for the arguments. Used by the attention-transfer cross-entropy term."""
    T = q.shape[1]
    groups = q.shape[2] // k.shape[2]
    kr = repeat_kv(k, groups)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    lin = torch.einsum("bihf,bjhf->bhij", hedgehog_feature_map(q, wq), hedgehog_feature_map(kr, wk))
    weights = lin * (j <= i - window)
    if window > 0:
        scores = softcap_scores(torch.einsum("bihd,bjhd->bhij", q.float(), kr.float()) * scale, softcap)
        in_window = (j <= i) & (j > i - window)
        scores = scores.masked_fill(~in_window, torch.finfo(scores.dtype).min)
        a = torch.exp(scores - scores.amax(-1, keepdim=True)) * in_window
        weights = weights + torch.sigmoid(window_factor.float())[None, :, None, None] * a
    return weights / (weights.sum(-1, keepdim=True) + EPS)


def hybrid_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    window_factor: torch.Tensor | None,
    window: int,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Quadratic reference of the hybrid op, no state in or out.

    Args:
        q: `[B, T, H, D]` queries after RoPE.
        k: `[B, T, Hkv, D]` keys after RoPE; `H` must be a multiple of `Hkv` (GQA).
        v: `[B, T, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights for queries and keys.
        window_factor: `[H]` logits of the window-term weight; ignored when `window == 0`.
        window: number of most recent tokens (the current one included) under exact softmax; 0 for none.
        scale: softmax scale of the window scores.
        softcap: optional logit soft-cap of the window scores.
        token_mask: `[B, T]` bool, False for padding; None means every token is real.
        upcast: compute in fp32 (the reference); False computes every product and the softmaxes in the type of
            `q`, as a 16-bit model would: the baseline whose error a 16-bit kernel is held to (flash-attention's
            rule).

    Returns:
        `[B, T, H, Dv]` in the dtype of `q`.
    """
    B, T, H, _ = q.shape
    groups = H // k.shape[2]
    ct = torch.float32 if upcast else q.dtype
    kr, vr = repeat_kv(k, groups).to(ct), repeat_kv(v, groups).to(ct)
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    key_ok = token_mask[:, None, None, :]
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]

    phi_q = hedgehog_feature_map(q, wq, ct)
    phi_k = hedgehog_feature_map(k if groups == 1 else repeat_kv(k, groups), wk, ct)
    lin = torch.einsum("bihf,bjhf->bhij", phi_q, phi_k)
    lin = lin * ((j <= i - window) & key_ok)
    num = torch.einsum("bhij,bjhd->bihd", lin, vr)
    den = lin.sum(-1).transpose(1, 2)

    if window > 0:
        scores = softcap_scores(torch.einsum("bihd,bjhd->bhij", q.to(ct), kr) * scale, softcap)
        in_window = (j <= i) & (j > i - window) & key_ok
        scores = scores.masked_fill(~in_window, torch.finfo(scores.dtype).min)
        a = torch.exp(scores - scores.amax(-1, keepdim=True)) * in_window
        g = torch.sigmoid(window_factor.float()).to(ct)[None, :, None, None]
        a = g * a
        num = num + torch.einsum("bhij,bjhd->bihd", a, vr)
        den = den + a.sum(-1).transpose(1, 2)
    return (num / (den[..., None] + EPS)).to(q.dtype)
