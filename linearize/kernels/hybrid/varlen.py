"""Variable-length batches for the hybrid op: sequences packed along one axis, delimited by `cu_seqlens`.

The packed tokens are gathered into a buffer laid out for the implementation, run through it with a token mask,
and gathered back, so every kernel takes packed input and the sequences never see each other:

- the Triton kernels (`aligned`) take the sequences one after another in one row, each starting at a chunk and
  padded in front to whole chunks (`hybrid_attention_triton`'s `chunk_offsets`): each sequence's state passes run
  as programs of their own, side by side, and no window reaches across. The row is the packed tokens plus under a
  chunk of padding per sequence, so a batch costs about what one sequence of its length does, or less;
- any other implementation (the PyTorch path) takes a left-padded `[N, L, ...]` batch. A padded row costs as much
  as the longest sequence; with `GROUPED` on, sequences of very different lengths are split into groups of similar
  length, one padded call each (`plan_groups`). It is off by default: on an H200 an earlier form of it ran the
  backward 4x slower than one call (a scatter-add for the gradient of each group's tokens, since replaced by
  gathers), and the present form is not yet timed there (docs/BENCHMARKS.md).

Either way, padding in front keeps each sequence's last tokens at the end of its row, where the final window is
read. A carried window from `initial_state` is placed just in front of its sequence, as masked-in tokens of the
row, so that its distance to the new tokens is the same as in an unpadded call.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import weakref

import torch

from .torch_chunked import HybridState

# With the Triton kernels, packed sequences run in one row at chunk boundaries (off: as a padded batch, as on the
# PyTorch path; for comparison, `benchmarks/bench_varlen.py`).
ALIGNED = True
GROUPED = False
# The Triton kernels' chunk (`triton_chunk.BLOCK_T`), kept here so that this module needs no triton import.
CHUNK = 64
# The cost model of `plan_groups`, in tokens of one padded row: the padding granularity (the Triton kernels' chunk)
# and what one more call costs besides its tokens (its launches, and a few rows' worth of sequential steps).
GROUP_ROUND = CHUNK
GROUP_OVERHEAD_TOKENS = 2048


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Validate `cu_seqlens` (`[N + 1]` int, 0 first, non-decreasing, `total` last) and return the lengths `[N]`."""
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


@dataclasses.dataclass
class _Layout:
    """Where a packed batch's tokens go in the buffer of rows that the implementation takes, and back.

    The rows of all calls (groups of sequences, `groups`) lie one after another in one buffer, in the order `order`
    of the sequences, row i `row_len[i]` positions long. `src[i]` is the packed token at position i (`total`: a row
    of zeros), which is also the way back; `placed[t]` the position of packed token t; `front` the positions of the
    carried windows, in front of each sequence; `chunk_offsets` (aligned) the sequences' offsets in chunks. The
    index tensors are on the device.
    """

    n: int
    groups: list[torch.Tensor]
    order: torch.Tensor
    row_len: torch.Tensor
    src: torch.Tensor
    placed: torch.Tensor
    front: torch.Tensor | None
    chunk_offsets: torch.Tensor | None


def _plan_layout(cu_seqlens: torch.Tensor, total: int, carried: int, slots: int, aligned: bool,
                 device: torch.device) -> _Layout:  # fmt: skip
    lens = check_cu_seqlens(cu_seqlens, total)
    n = lens.numel()
    if aligned:
        # One row: each sequence (its carried window in front) padded in front to whole chunks.
        groups = [torch.arange(n)]
        row_len = (lens + carried).clamp_min(1).add(CHUNK - 1).div(CHUNK, rounding_mode="floor").mul(CHUNK)
    else:
        # Rows of a padded batch per group, each as long as the group's longest sequence.
        groups = plan_groups(lens + carried) if GROUPED else [torch.arange(n)]
        row_len = torch.cat([(lens[idx].max() + carried).expand(idx.numel()) for idx in groups])
    order = torch.cat(groups)
    ordered = lens[order]
    row_start = torch.cumsum(row_len, 0) - row_len
    size = int(row_len.sum())
    # Token `within` of row r sits at row_start + row_len - len + within: padded in front, so that each sequence's
    # last tokens end its row, where the final window is read.
    row = torch.repeat_interleave(torch.arange(n), ordered)
    within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(ordered, 0) - ordered, ordered)
    starts = torch.cumsum(lens, 0) - lens
    tok = torch.repeat_interleave(starts[order], ordered) + within
    placed = torch.empty(total, dtype=torch.long)
    placed[tok] = (row_start + row_len - ordered)[row] + within
    src = torch.full((size,), total, dtype=torch.long)
    src[placed] = torch.arange(total)
    index = [src, placed]
    if carried and slots:
        # The carried window becomes the `slots` positions in front of each sequence.
        index.append(((row_start + row_len - ordered - slots)[:, None] + torch.arange(slots)).reshape(-1))
    if aligned:
        index.append(torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(row_len // CHUNK, 0)]))
    # The index tensors move to the device in one copy (from pageable memory, each copy waits for the stream).
    moved = torch.cat(index).to(device).split([t.numel() for t in index])
    return _Layout(n, groups, order, row_len, moved[0], moved[1], moved[2] if carried and slots else None,
                   moved[-1] if aligned else None)  # fmt: skip


# Layouts of recent calls, by the identity of their `cu_seqlens` tensor: every layer of a model gets the same one
# in a step (transformers passes it down unchanged), so the layout, its checks (which read cu_seqlens on the host:
# a wait for the device) and its copy to the device are made once per step rather than once per layer.
_LAYOUTS: dict[tuple, tuple[weakref.ref, _Layout]] = {}
LAYOUT_CACHE = 16


def _layout(cu_seqlens, total, carried, slots, aligned, device) -> _Layout:
    key = (id(cu_seqlens), cu_seqlens._version, total, carried, slots, aligned, not aligned and GROUPED,
           GROUP_OVERHEAD_TOKENS, str(device))  # fmt: skip
    hit = _LAYOUTS.get(key)
    # The weak reference tells a live tensor from a new one that reuses a freed one's id.
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    layout = _plan_layout(cu_seqlens, total, carried, slots, aligned, device)
    for stale in [k for k, (ref, _) in _LAYOUTS.items() if ref() is None]:
        del _LAYOUTS[stale]
    while len(_LAYOUTS) >= LAYOUT_CACHE:
        del _LAYOUTS[next(iter(_LAYOUTS))]
    _LAYOUTS[key] = (weakref.ref(cu_seqlens), layout)
    return layout


def hybrid_attention_varlen(impl, q, k, v, wq, wk, window_factor, window, scale, softcap=None, token_mask=None,
                            initial_state=None, output_final_state=False, chunk_size=128, *, cu_seqlens,
                            aligned=False):  # fmt: skip
    """Run `impl` (a function with `hybrid_attention`'s arguments) over the sequences of a packed batch.

    Args as `hybrid_attention`, with q, k, v of shape `[1, total, heads, dim]`, `token_mask` `[1, total]` or None,
    `initial_state` (batch N) or None and `cu_seqlens` `[N + 1]`. With `aligned`, `impl` is the Triton path and
    takes `chunk_offsets` (`hybrid_attention_triton`): the sequences are laid out one after another in one row, each
    from a chunk boundary, rather than as the rows of a padded batch. Returns `([1, total, H, Dv]`, final state of
    batch N or None).
    """
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the inputs are packed along T with batch size 1, got batch {q.shape[0]}")
    total, device = q.shape[1], q.device
    slots = max(window - 1, 0)
    carried = slots if initial_state is not None else 0
    lay = _layout(cu_seqlens, total, carried, slots, aligned, device)
    n, order = lay.n, lay.order
    if initial_state is not None and initial_state.kv.shape[0] != n:
        raise ValueError(f"initial_state holds {initial_state.kv.shape[0]} sequences, cu_seqlens {n}")
    carry = lay.front is not None

    def lay_out(x, window=None):
        out = _take_rows(x, lay.src, lay.placed)
        if window is not None:
            out = out.index_put((lay.front,), window[order].flatten(0, 1).to(x.dtype))
        return out

    mask = torch.ones(total, dtype=torch.bool, device=device) if token_mask is None else token_mask[0]
    qp = lay_out(q[0])
    kp = lay_out(k[0], initial_state.win_k if carry else None)
    vp = lay_out(v[0], initial_state.win_v if carry else None)
    mp = lay_out(mask, initial_state.win_mask if carry else None)
    state = initial_state
    if carry:
        # The carried windows are tokens of the rows now; the state keeps none.
        state = HybridState(state.kv, state.ksum, torch.zeros_like(state.win_k), torch.zeros_like(state.win_v),
                            torch.zeros_like(state.win_mask))  # fmt: skip
    if aligned:
        out, final = impl(qp[None], kp[None], vp[None], wq, wk, window_factor, window, scale, softcap, mp[None],
                          state, output_final_state, chunk_size, chunk_offsets=lay.chunk_offsets)  # fmt: skip
        out = out[0]
    else:
        outs, finals = [], []
        bounds = [0, *itertools.accumulate(idx.numel() for idx in lay.groups)]
        sizes = [int(lay.row_len[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        parts = [t.split(sizes) for t in (qp, kp, vp, mp)]
        for g, idx in enumerate(lay.groups):
            m = idx.numel()
            rows = [t[g].view(m, -1, *t[g].shape[1:]) for t in parts]
            st = None if state is None else state.index_select(idx)
            o, f = impl(*rows[:3], wq, wk, window_factor, window, scale, softcap, rows[3], st, output_final_state,
                        chunk_size)  # fmt: skip
            outs.append(o.reshape(m * o.shape[1], *o.shape[2:]))
            finals.append(f)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        final = finals[0] if len(finals) == 1 else None
        if output_final_state and len(finals) > 1:
            final = HybridState(*(torch.cat(ts, 0) for ts in zip(*(f.tensors() for f in finals), strict=True)))
    # Back to packed order: the buffer's padding gets no gradient.
    out = _take_rows(out, lay.placed, lay.src).unsqueeze(0)
    if not output_final_state:
        return out, None
    # Groups hold the sequences longest first: their final states go back to the packed order.
    return out, final if torch.equal(order, torch.arange(n)) else final.index_select(torch.argsort(order))
