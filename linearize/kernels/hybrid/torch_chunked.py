"""Chunked PyTorch implementation of the hybrid op, with recurrent state in and out.

This is the path used off-GPU for training, prefill and decoding. Tokens are processed in chunks of `chunk_size`;
within a chunk the scores against [the last W-1 tokens, the chunk] are computed exactly, everything older lives in
the linear state. Memory is O(T * chunk) rather than O(T^2), and decoding is the same code with T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import EPS, hedgehog_feature_map, repeat_kv, softcap_scores


@dataclass
class HybridState:
    """Recurrent state of one layer: what a decoder carries from one token to the next.

    Attributes:
        kv: `[B, H, 2F, Dv]` fp32, sum of phi_k(k_j) v_j^T over tokens that left the window.
        ksum: `[B, H, 2F]` fp32, sum of phi_k(k_j) over the same tokens (the normaliser).
        win_k: `[B, W-1, Hkv, D]` raw keys of the last W-1 tokens (oldest first); size 0 when W == 0.
        win_v: `[B, W-1, Hkv, Dv]` their values.
        win_mask: `[B, W-1]` bool, True where the slot holds a real token.
    """

    kv: torch.Tensor
    ksum: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_mask: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        v_dim: int,
        features: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> HybridState:
        slots = max(window - 1, 0)
        return cls(
            kv=torch.zeros(batch, heads, features, v_dim, dtype=torch.float32, device=device),
            ksum=torch.zeros(batch, heads, features, dtype=torch.float32, device=device),
            win_k=torch.zeros(batch, slots, kv_heads, head_dim, dtype=dtype, device=device),
            win_v=torch.zeros(batch, slots, kv_heads, v_dim, dtype=dtype, device=device),
            win_mask=torch.zeros(batch, slots, dtype=torch.bool, device=device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv, self.ksum, self.win_k, self.win_v, self.win_mask)

    def index_select(self, index: torch.Tensor) -> HybridState:
        return HybridState(*(t.index_select(0, index.to(t.device)) for t in self.tensors()))

    def repeat_interleave(self, repeats: int) -> HybridState:
        return HybridState(*(t.repeat_interleave(repeats, dim=0) for t in self.tensors()))

    def to(self, device: torch.device) -> HybridState:
        return HybridState(*(t.to(device) for t in self.tensors()))


def hybrid_attention_chunked(
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
    initial_state: HybridState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 128,
    linear: bool = True,
) -> tuple[torch.Tensor, HybridState | None]:
    """Hybrid attention over a block of new tokens, continuing from `initial_state`.

    Args:
        q: `[B, T, H, D]` queries after RoPE.
        k: `[B, T, Hkv, D]` keys after RoPE.
        v: `[B, T, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights.
        window_factor: `[H]` logits of the window-term weight; ignored when `window == 0`.
        window: size of the exact-softmax window (current token included); 0 for plain linear attention.
        scale: softmax scale of the window scores.
        softcap: optional logit soft-cap of the window scores.
        token_mask: `[B, T]` bool, False for padding tokens, which then enter neither term nor the state.
        initial_state: state after the previous tokens; None starts from empty.
        output_final_state: return the state after these tokens.
        chunk_size: tokens per chunk (default 128); any value gives the same result up to rounding.
        linear: include the linear term; False leaves the window term alone (the window-only control).

    Returns:
        `([B, T, H, Dv]` output in the dtype of `q`, final state or None).
    """
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    groups = H // Hkv
    features = 2 * wq.shape[-1]
    device = q.device
    state = initial_state or HybridState.zeros(B, H, Hkv, D, Dv, features, window, k.dtype, device)
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    slots = state.win_k.shape[1]
    g = torch.sigmoid(window_factor.float())[None, :, None] if window > 0 else None

    kv, ksum = state.kv, state.ksum
    win_k, win_v, win_mask = state.win_k, state.win_v, state.win_mask
    phi_q_all = hedgehog_feature_map(q, wq)
    outputs = []
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        n_new = stop - start
        keys = torch.cat([win_k, k[:, start:stop]], dim=1)
        values = torch.cat([win_v, v[:, start:stop]], dim=1)
        key_ok = torch.cat([win_mask, token_mask[:, start:stop]], dim=1)
        kr = repeat_kv(keys, groups)
        vr = repeat_kv(values, groups).float()
        phi_q = phi_q_all[:, start:stop]
        phi_k = hedgehog_feature_map(kr, wk) * key_ok[:, :, None, None]

        # Query i of the chunk sits at position slots + i of the concatenated keys.
        qi = torch.arange(n_new, device=device)[:, None] + slots
        kj = torch.arange(slots + n_new, device=device)[None, :]
        lin = torch.einsum("bihf,bjhf->bhij", phi_q, phi_k) * (kj <= qi - window) * linear
        num = torch.einsum("bhij,bjhd->bihd", lin, vr) + torch.einsum("bihf,bhfd->bihd", phi_q, kv) * linear
        den = lin.sum(-1).transpose(1, 2) + torch.einsum("bihf,bhf->bih", phi_q, ksum) * linear

        if window > 0:
            scores = torch.einsum("bihd,bjhd->bhij", q[:, start:stop].float(), kr.float()) * scale
            scores = softcap_scores(scores, softcap)
            in_window = (kj <= qi) & (kj > qi - window) & key_ok[:, None, None, :]
            scores = scores.masked_fill(~in_window, torch.finfo(scores.dtype).min)
            a = torch.exp(scores - scores.amax(-1, keepdim=True)) * in_window
            a = a * g[..., None]
            num = num + torch.einsum("bhij,bjhd->bihd", a, vr)
            den = den + a.sum(-1).transpose(1, 2)
        outputs.append((num / (den[..., None] + EPS)).to(q.dtype))

        # The oldest n_new of the concatenated tokens leave the window and fold into the linear state.
        kv = kv + torch.einsum("bjhf,bjhd->bhfd", phi_k[:, :n_new], vr[:, :n_new])
        ksum = ksum + phi_k[:, :n_new].sum(1)
        win_k, win_v, win_mask = keys[:, n_new:], values[:, n_new:], key_ok[:, n_new:]

    out = torch.cat(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, Dv)
    final = HybridState(kv, ksum, win_k, win_v, win_mask) if output_final_state else None
    return out, final
