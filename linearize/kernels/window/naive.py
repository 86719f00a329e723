"""Ground truth for the sliding-window softmax branch of the gated kinds, with optional sink logits.

For query i of one head and keys i - W < j <= i (the current token included), s_ij = scale * q_i . k_j
(soft-capped as the hybrid op does) and m_i the largest of them:

    num_i = sum_j exp(s_ij - m_i) v_j,     den_i = sum_j exp(s_ij - m_i) + sum_s exp(sink_s - m_i)

The branch returns num and den rather than their ratio, so that a kind can share one normaliser with a linear
branch whose terms are on the same scale (LoLCATs' and Lizard's design: the window's largest score counts 1) or
normalise it alone (Liger). Sink logits are per head and carry no value: they only add to the normaliser.
"""

from __future__ import annotations

import torch

from ..hybrid.naive import repeat_kv, softcap_scores


def window_max(scores: torch.Tensor, in_window: torch.Tensor) -> torch.Tensor:
    """Row maxima of the in-window scores, 0 for a row with no key (a padding query), keeping exp finite."""
    masked = scores.masked_fill(~in_window, float("-inf")).amax(-1, keepdim=True)
    return torch.where(torch.isinf(masked), torch.zeros_like(masked), masked).detach()


def window_terms(
    scores: torch.Tensor, in_window: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` `[B, H, Tq, Tk]` fp32, `in_window` broadcastable bool, `values` `[B, Tk, H, V]` fp32 ->
    (num `[B, Tq, H, V]`, den `[B, Tq, H]`)."""
    m = window_max(scores, in_window)
    a = torch.exp((scores - m).masked_fill(~in_window, float("-inf")))
    num = torch.einsum("bhij,bjhv->bihv", a, values)
    den = a.sum(-1)
    if sinks is not None:
        den = den + torch.exp(sinks.float()[None, :, None, :] - m).sum(-1)
    return num, den.transpose(1, 2)


def window_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic reference of the window branch, no state.

    Args:
        q: `[B, T, H, D]`.
        k: `[B, T, Hkv, D]`; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]`.
        window: keys per query, the current one included (>= 1).
        scale: score scale.
        sinks: `[H, S]` sink logits, or None.
        softcap: optional logit soft-cap.
        token_mask: `[B, T]` bool, False for padding keys.

    Returns:
        (num `[B, T, H, V]` fp32, den `[B, T, H]` fp32).
    """
    B, T, H, _ = q.shape
    groups = H // k.shape[2]
    kr, vr = repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
    scores = softcap_scores(torch.einsum("bihd,bjhd->bhij", q.float(), kr) * scale, softcap)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = ((j <= i) & (j > i - window))[None, None]
    if token_mask is not None:
        in_window = in_window & token_mask[:, None, None, :]
    return window_terms(scores, in_window, vr, sinks)
