"""Variable-length batches for the hybrid op: sequences packed along one axis, delimited by `cu_seqlens`.

The packed tokens are scattered into a left-padded `[N, L, ...]` batch, run through any implementation with a
token mask, and gathered back, so every kernel (the Triton ones and the PyTorch path) takes packed input and the
sequences never see each other. Left padding keeps each sequence's last tokens at the end of its row, which is
where the final window is read. A carried window from `initial_state` is placed just in front of its sequence,
as masked-in tokens of the padded row, so that its distance to the new tokens is the same as in an unpadded call.

A padded row costs as much as the longest sequence. With `GROUPED` on, sequences of very different lengths are
split into groups of similar length, one padded call each (`plan_groups`), so that a packed row of one long and
many short documents does not pay the long one's length for every short one. It is off by default: on an H200 an
earlier form of it ran the backward 4x slower than one call (a scatter-add for the gradient of each group's
tokens, since replaced by gathers), and the present form is not yet timed there (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import itertools

import torch

from .torch_chunked import HybridState

GROUPED = False
# The cost model of `plan_groups`, in tokens of one padded row: the padding granularity (the Triton kernels' chunk)
# and what one more call costs besides its tokens (its launches, and a few rows' worth of sequential steps).
GROUP_ROUND = 64
GROUP_OVERHEAD_TOKENS = 2048


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


def plan_groups(lengths: torch.Tensor, overhead: int | None = None, round_to: int = GROUP_ROUND) -> list[torch.Tensor]:
    """Split sequences into groups, one padded call each, minimising the padded tokens plus `overhead` per call.

    Args:
        lengths: `[N]` tokens per sequence (each row's length, carried window included), on the CPU.
        overhead: tokens one more call is worth (default `GROUP_OVERHEAD_TOKENS`).
        round_to: rows are padded to a multiple of this.

    Returns:
        The groups as index tensors into `lengths`, longest sequences first. Each is a run of the sequences sorted by
        length (an optimal split of sorted lengths is contiguous), found by dynamic programming over the distinct
        padded lengths.
    """
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    if lengths.numel() == 0:
        return []
    padded = (lengths.clamp_min(1) + round_to - 1) // round_to * round_to
    order = torch.sort(padded, descending=True, stable=True).indices
    values, counts = torch.unique_consecutive(padded[order], return_counts=True)
    bounds = (0, *torch.cumsum(counts, 0).tolist())
    cuts = _cuts(tuple(values.tolist()), tuple(counts.tolist()), overhead)
    return [order[bounds[a] : bounds[b]] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@functools.lru_cache(maxsize=256)
def _cuts(values: tuple[int, ...], counts: tuple[int, ...], overhead: int) -> tuple[int, ...]:
    """Group boundaries over the distinct padded lengths `values` (descending, `counts` rows each): a group of
    values i..j-1 pads every row to values[i]. The same plan serves every layer of a step, so it is cached."""
    m = len(values)
    rows = (0, *itertools.accumulate(counts))
    best = [0] + [None] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):
            cost = best[i] + (rows[j] - rows[i]) * values[i] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [m], m
    while j:
        j = cut[j]
        out.append(j)
    return tuple(out[::-1])


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of x with a row of zeros appended (index len(x) picks it)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, index)


class _TakeRows(torch.autograd.Function):
    """out[i] = x[src[i]], or zeros where src[i] == len(x); each row of x lands at most once, at back[j] (len(out)
    where nowhere), so the gradient is a gather too, not the scatter with atomic adds of `index_select`'s gradient
    (with it, grouped calls ran the backward 4x slower than one call on an H200: docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x, src, back):
        ctx.save_for_backward(back)
        return _rows(x, src)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return _rows(grad, back), None, None


def _take_rows(x: torch.Tensor, src: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    return _TakeRows.apply(x, src, back) if x.requires_grad else _rows(x, src)


def hybrid_attention_varlen(impl, q, k, v, wq, wk, window_factor, window, scale, softcap=None, token_mask=None,
                            initial_state=None, output_final_state=False, chunk_size=128, *, cu_seqlens):  # fmt: skip
    """Run `impl` (a function with `hybrid_attention`'s arguments) over the sequences of a packed batch.

    Args as `hybrid_attention`, with q, k, v of shape `[1, total, heads, dim]`, `token_mask` `[1, total]` or None,
    `initial_state` (batch N) or None and `cu_seqlens` `[N + 1]`. Returns `([1, total, H, Dv]`, final state of
    batch N or None).
    """
    lens = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    n = lens.numel()
    if initial_state is not None and initial_state.kv.shape[0] != n:
        raise ValueError(f"initial_state holds {initial_state.kv.shape[0]} sequences, cu_seqlens {n}")
    total, device = q.shape[1], q.device
    slots = max(window - 1, 0)
    carried = slots if initial_state is not None else 0
    carry = initial_state is not None and slots > 0
    starts = torch.cumsum(lens, 0) - lens
    # Where each packed token sits in the padded rows of all groups, one after another.
    placed = torch.empty(total, dtype=torch.long)
    groups = plan_groups(lens + carried) if GROUPED else [torch.arange(n)]
    # Per group: its sequences, rows and row length, and the index tensors it moves rows with (built on the CPU,
    # moved to the device below in one copy).
    layouts, index, offset = [], [], 0
    for idx in groups:
        gl = lens[idx]
        length = int(gl.max()) + carried
        m = idx.numel()
        # Token t of the group's sequence r (its row) goes to column length - len + (t - start): left padding.
        row = torch.repeat_interleave(torch.arange(m), gl)
        first = torch.cumsum(gl, 0) - gl
        within = torch.arange(int(gl.sum())) - torch.repeat_interleave(first, gl)
        tok = torch.repeat_interleave(starts[idx], gl) + within
        pos = row * length + length - gl[row] + within
        src = torch.full((m * length,), total, dtype=torch.long)
        src[pos] = tok
        placed[tok] = offset + pos
        index.append(src)
        if carry:
            # The carried window becomes the `slots` columns in front of each sequence; the state keeps no window.
            index.append(((torch.arange(m) * length + length - gl - slots)[:, None] + torch.arange(slots)).reshape(-1))
        layouts.append((idx, m, length, offset))
        offset += m * length
    for _, m, length, base in layouts:
        # The inverse of the group's src: where each packed token sits in its rows (m * length: in none).
        back = placed - base
        index.append(torch.where((back >= 0) & (back < m * length), back, m * length))
    # Back to packed order at the end: padding rows get no gradient.
    unplaced = torch.full((offset,), total, dtype=torch.long)
    unplaced[placed] = torch.arange(total)
    index += [placed, unplaced]
    moved = iter(torch.cat(index).to(device).split([t.numel() for t in index]))
    per_group = [(next(moved), next(moved) if carry else None) for _ in layouts]
    backs = [next(moved) for _ in layouts]
    placed, unplaced = next(moved), next(moved)

    outs, finals = [], []
    mask = torch.ones(total, dtype=torch.bool, device=device) if token_mask is None else token_mask[0]
    for (idx, m, length, _), (src, front), back in zip(layouts, per_group, backs, strict=True):
        state = None if initial_state is None else initial_state.index_select(idx)

        def scatter(x, window=None, src=src, back=back, front=front, m=m, length=length):
            out = _take_rows(x, src, back)
            if window is not None:
                out = out.index_put((front,), window.flatten(0, 1).to(x.dtype))
            return out.view(m, length, *x.shape[1:])

        qp = scatter(q[0])
        kp = scatter(k[0], state.win_k if carry else None)
        vp = scatter(v[0], state.win_v if carry else None)
        mp = scatter(mask, state.win_mask if carry else None)
        if carry:
            state = HybridState(state.kv, state.ksum, torch.zeros_like(state.win_k), torch.zeros_like(state.win_v),
                                torch.zeros_like(state.win_mask))  # fmt: skip
        out, final = impl(qp, kp, vp, wq, wk, window_factor, window, scale, softcap, mp, state, output_final_state,
                          chunk_size)  # fmt: skip
        outs.append(out.reshape(m * length, *out.shape[2:]))
        finals.append(final)
    padded = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = _take_rows(padded, placed, unplaced).unsqueeze(0)
    if not output_final_state:
        return out, None
    final = finals[0] if len(finals) == 1 else HybridState(
        *(torch.cat(ts, 0) for ts in zip(*(f.tensors() for f in finals), strict=True))
    )  # fmt: skip
    order = torch.cat(groups)
    # Groups hold the sequences longest first: their final states go back to the packed order.
    return out, final if torch.equal(order, torch.arange(n)) else final.index_select(torch.argsort(order))
