"""Variable-length batches for the hybrid op: sequences packed along one axis, delimited by `cu_seqlens`.

The packed tokens are scattered into a left-padded `[N, L, ...]` batch, run through any implementation with a
token mask, and gathered back, so every kernel (the Triton ones and the PyTorch path) takes packed input and the
sequences never see each other. Left padding keeps each sequence's last tokens at the end of its row, which is
where the final window is read. A carried window from `initial_state` is placed just in front of its sequence,
as masked-in tokens of the padded row, so that its distance to the new tokens is the same as in an unpadded call.
"""

from __future__ import annotations

import torch

from .torch_chunked import HybridState


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int) -> torch.Tensor:
    """Validate `cu_seqlens` (`[N + 1]` int, 0 first, non-decreasing, `total` last) and return the lengths `[N]`."""
    if batch != 1:
        raise ValueError(f"with cu_seqlens the inputs are packed along T with batch size 1, got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1], got {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to("cpu", torch.int64)
    lens = cu.diff()
    if cu[0] != 0 or cu[-1] != total or (lens < 0).any():
        raise ValueError(f"cu_seqlens must start at 0, not decrease and end at the packed length {total}")
    return lens


def hybrid_attention_varlen(impl, q, k, v, wq, wk, window_factor, window, scale, softcap=None, token_mask=None,
                            initial_state=None, output_final_state=False, chunk_size=128, *, cu_seqlens):  # fmt: skip
    """Run `impl` (a function with `hybrid_attention`'s arguments) over the sequences of a packed batch.

    Args as `hybrid_attention`, with q, k, v of shape `[1, total, heads, dim]`, `token_mask` `[1, total]` or None,
    `initial_state` (batch N) or None and `cu_seqlens` `[N + 1]`. Returns `([1, total, H, Dv]`, final state of
    batch N or None).
    """
    lens = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    n = lens.numel()
    device = q.device
    slots = max(window - 1, 0)
    carried = slots if initial_state is not None else 0
    length = int(lens.max()) + carried if n else 0
    if initial_state is not None and initial_state.kv.shape[0] != n:
        raise ValueError(f"initial_state holds {initial_state.kv.shape[0]} sequences, cu_seqlens {n}")
    # Packed token t of sequence b goes to row b, column length - len_b + (t - start_b).
    seq = torch.repeat_interleave(torch.arange(n), lens)
    starts = torch.cumsum(lens, 0) - lens
    col = length - lens[seq] + torch.arange(int(lens.sum())) - starts[seq]
    dest = (seq * length + col).to(device)

    carry = initial_state is not None and slots > 0
    if carry:
        # The carried window becomes the `slots` columns in front of each sequence; the state keeps no window.
        front = ((torch.arange(n) * length + length - lens - slots)[:, None] + torch.arange(slots)).reshape(-1)
        front = front.to(device)

    def scatter(x: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        out = x.new_zeros((n * length, *x.shape[2:])).index_put((dest,), x[0])
        if window is not None:
            out = out.index_put((front,), window.flatten(0, 1).to(x.dtype))
        return out.view(n, length, *x.shape[2:])

    mask = torch.ones_like(q[..., 0, 0], dtype=torch.bool) if token_mask is None else token_mask
    qp = scatter(q)
    kp = scatter(k, initial_state.win_k if carry else None)
    vp = scatter(v, initial_state.win_v if carry else None)
    mp = scatter(mask, initial_state.win_mask if carry else None)
    state = initial_state
    if carry:
        state = HybridState(
            initial_state.kv,
            initial_state.ksum,
            torch.zeros_like(initial_state.win_k),
            torch.zeros_like(initial_state.win_v),
            torch.zeros_like(initial_state.win_mask),
        )
    out, final = impl(qp, kp, vp, wq, wk, window_factor, window, scale, softcap, mp, state, output_final_state,
                      chunk_size)  # fmt: skip
    out = out.reshape(n * length, *out.shape[2:])[dest].unsqueeze(0)
    return out, final
