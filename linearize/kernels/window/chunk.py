"""Chunked PyTorch path of the window branch, with the ring buffer that decoding carries.

Queries go in chunks; each chunk scores against [the last W - 1 keys, the chunk], as the hybrid op's chunked path
does, so memory is O(T * (C + W)) and a decoding step is the same code with T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hybrid.naive import repeat_kv, softcap_scores
from .naive import window_terms


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

    Returns:
        (num `[B, T, H, V]` fp32, den `[B, T, H]` fp32, state after these tokens or None).
    """
    B, T, H, _ = q.shape
    groups = H // k.shape[2]
    state = initial_state if initial_state is not None else WindowState.empty(B, window, k, v)
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    win_k, win_v, win_mask = state.keys, state.values, state.mask
    slots = win_k.shape[1]
    nums, dens = [], []
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        n_new = stop - start
        keys = torch.cat([win_k, k[:, start:stop].to(win_k.dtype)], dim=1)
        values = torch.cat([win_v, v[:, start:stop].to(win_v.dtype)], dim=1)
        key_ok = torch.cat([win_mask, token_mask[:, start:stop]], dim=1)
        kr, vr = repeat_kv(keys, groups).float(), repeat_kv(values, groups).float()
        scores = softcap_scores(torch.einsum("bihd,bjhd->bhij", q[:, start:stop].float(), kr) * scale, softcap)
        # Query i of the chunk sits at position slots + i of the concatenated keys.
        qi = torch.arange(n_new, device=q.device)[:, None] + slots
        kj = torch.arange(slots + n_new, device=q.device)[None, :]
        in_window = ((kj <= qi) & (kj > qi - window))[None, None] & key_ok[:, None, None, :]
        num, den = window_terms(scores, in_window, vr, sinks)
        nums.append(num)
        dens.append(den)
        win_k, win_v, win_mask = keys[:, n_new:], values[:, n_new:], key_ok[:, n_new:]
    V = v.shape[-1]
    num = torch.cat(nums, 1) if nums else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    den = torch.cat(dens, 1) if dens else q.new_zeros(B, 0, H, dtype=torch.float32)
    final = WindowState(win_k, win_v, win_mask) if output_final_state else None
    return num, den, final
