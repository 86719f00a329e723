"""Chunked PyTorch path of the window branch, with the ring buffer that decoding carries.

Queries go in chunks; each chunk scores against [the W - 1 keys before it, the chunk], as the hybrid op's chunked
path does, all chunks in one batched product, so memory is O(T * (C + W)) and a decoding step is the same code with
T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hybrid.naive import softcap_scores
from .naive import window_max


@dataclass
class WindowState:
    """The last W - 1 raw keys and values of one layer (oldest first).

    Attributes:
        keys: `[B, W-1, Hkv, D]`.
        values: `[B, W-1, Hkv, V]`.
        mask: `[B, W-1]` bool, True where the slot holds a real token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def empty(cls, batch: int, window: int, k: torch.Tensor, v: torch.Tensor) -> WindowState:
        slots = max(window - 1, 0)
        return cls(
            k.new_zeros(batch, slots, *k.shape[2:]),
            v.new_zeros(batch, slots, *v.shape[2:]),
            torch.zeros(batch, slots, dtype=torch.bool, device=k.device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values, self.mask)


def window_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    initial_state: WindowState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, WindowState | None]:
    """Window branch over a block of new tokens, continuing from `initial_state`; see `window_naive`.

    Every chunk of queries is scored at once against its own [W - 1 + C] keys (an unfolded view of the carried
    keys followed by the new ones), so there is no loop over chunks: one batched product on any device.

    Returns:
        (num `[B, T, H, V]` fp32, den `[B, T, H]` fp32, state after these tokens or None).
    """
    B, T, H, D = q.shape
    V = v.shape[-1]
    groups = H // k.shape[2]
    state = initial_state if initial_state is not None else WindowState.empty(B, window, k, v)
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    slots = state.keys.shape[1]
    keys = torch.cat([state.keys, k.to(state.keys.dtype)], dim=1)
    values = torch.cat([state.values, v.to(state.values.dtype)], dim=1)
    key_ok = torch.cat([state.mask, token_mask], dim=1)
    final = WindowState(keys[:, T:], values[:, T:], key_ok[:, T:]) if output_final_state else None
    if T == 0:
        return q.new_zeros(B, 0, H, V, dtype=torch.float32), q.new_zeros(B, 0, H, dtype=torch.float32), final
    C = min(chunk_size, T)
    pad = (-T) % C
    n = (T + pad) // C
    # Padding at the end: masked keys, queries whose rows are cut off below.
    keys, values = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (keys, values))
    key_ok = F.pad(key_ok, (0, pad), value=False)
    qc = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, n, C, H, D)
    span = slots + C
    # [B, N, span, Hkv, *]: chunk i sees positions i * C .. i * C + span - 1 of the concatenated keys; the query
    # heads of a group share their key/value head without copies.
    kc = keys.unfold(1, span, C).permute(0, 1, 4, 2, 3).float()
    vc = values.unfold(1, span, C).permute(0, 1, 4, 2, 3).float()
    ok = key_ok.unfold(1, span, C)
    qg = qc.unflatten(3, (H // groups, groups))
    scores = softcap_scores(torch.einsum("bnihgd,bnjhd->bnhgij", qg, kc).flatten(2, 3) * scale, softcap)
    # Query i of a chunk sits at position slots + i of its keys.
    qi = torch.arange(C, device=q.device)[:, None] + slots
    kj = torch.arange(span, device=q.device)[None, :]
    in_window = ((kj <= qi) & (kj > qi - window))[None, None, None] & ok[:, :, None, None, :]
    m = window_max(scores, in_window)
    a = torch.exp((scores - m).masked_fill(~in_window, float("-inf")))
    num = torch.einsum("bnhgij,bnjhv->bnihgv", a.unflatten(2, (H // groups, groups)), vc).flatten(3, 4)
    den = a.sum(-1)
    if sinks is not None:
        den = den + torch.exp(sinks.float()[None, None, :, None, :] - m).sum(-1)
    num = num.flatten(1, 2)[:, :T]
    den = den.transpose(2, 3).flatten(1, 2)[:, :T]
    return num, den, final
