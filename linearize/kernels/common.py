"""The frame the PyTorch paths of the gated ops (`gla`, `delta`, `rwkv7`) share; each op supplies only its math.

`torch_path` picks the step-by-step or the chunked path and runs packed sequences one by one; `recurrent_scan`
carries the fp32 state token by token; `split_chunks` and `merge_chunks` cut the time axis into chunks and back.
The naive references keep their own loops on purpose: they share no code with the paths they check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Inputs up to this many tokens without gradients (decoding steps) take the step-by-step PyTorch path.
RECURRENT_MAX_TOKENS = 16

# A path's result: `[B, T, H, V]` fp32 output and `[B, H, K, V]` fp32 final state (or None).
Result = tuple[torch.Tensor, torch.Tensor | None]


def fp32_state(initial_state: torch.Tensor | None, B: int, H: int, K: int, V: int, device) -> torch.Tensor:
    """`initial_state` in fp32, or a `[B, H, K, V]` fp32 zero state where there is none."""
    if initial_state is not None:
        return initial_state.float()
    return torch.zeros(B, H, K, V, dtype=torch.float32, device=device)


def torch_path(
    recurrent: Callable[..., Result],
    chunk: Callable[..., Result],
    tensors: Sequence[torch.Tensor],
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> Result:
    """Run an op's PyTorch path on `tensors` (`[B, T, H, *]`, the op's positional inputs in order).

    Short inputs without gradients (decoding) take `recurrent`, the rest `chunk` (called with `chunk_size`); both
    are called as `path(*tensors, scale, initial_state, output_final_state)`. With `cu_seqlens` (B = 1) each packed
    sequence runs on its own from its row of `initial_state`; the outputs are concatenated along T and the final
    states stacked along N.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if tensors[0].shape[1] <= RECURRENT_MAX_TOKENS and not needs_grad:
        run = recurrent
    else:
        run = functools.partial(chunk, chunk_size=chunk_size)
    if cu_seqlens is None:
        return run(*tensors, scale, initial_state, output_final_state)
    return run_packed(lambda parts, init: run(*parts, scale, init, True), tensors, initial_state, output_final_state,
                      cu_seqlens)  # fmt: skip


def run_packed(
    run: Callable[[list, object], tuple[torch.Tensor, object]],
    tensors: Sequence[torch.Tensor | None],
    initial_state,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
    take: Callable[[object, int], object] = lambda state, n: state[n : n + 1],
    join: Callable[[list], object] = lambda states: torch.cat(states, 0),
):
    """Each of the N sequences packed along T (B = 1) on its own: `run(parts, init)` on its slice of every tensor
    (None stays None) from its row of `initial_state` (`take(state, n)`); the outputs are concatenated along T and
    the final states joined along N (`join`, when `output_final_state`)."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        init = take(initial_state, n) if initial_state is not None else None
        o, s = run([None if x is None else x[:, a:b] for x in tensors], init)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), join(states) if output_final_state else None


def recurrent_scan(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    value_dim: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> Result:
    """Token by token: `state, o_t = step(state, *(x[:, t] in fp32 for x in tensors))`.

    Args:
        step: one token's update; gets the `[B, H, K, V]` fp32 state and each input's `[B, H, *]` slice.
        tensors: `[B, T, H, *]` inputs, the first `[B, T, H, K]` (it sets the state's B, H and K).
        value_dim: V, the state's last dimension.
        initial_state: `[B, H, K, V]`; None starts from zeros.
        output_final_state: return the state after these tokens.

    Returns:
        `([B, T, H, V]` fp32 output, `[B, H, K, V]` fp32 state or None).
    """
    first = tensors[0]
    B, T, H, K = first.shape
    state = fp32_state(initial_state, B, H, K, value_dim, first.device)
    outputs = []
    for t in range(T):
        state, o = step(state, *(x[:, t].float() for x in tensors))
        outputs.append(o)
    o = torch.stack(outputs, 1) if outputs else first.new_zeros(B, 0, H, value_dim, dtype=torch.float32)
    return o, state if output_final_state else None


def split_chunks(tensors: Sequence[torch.Tensor], chunk_size: int) -> list[torch.Tensor]:
    """`[B, T, H, *]` inputs -> `[B, H, N, C, *]` fp32 chunks of C = `chunk_size` tokens.

    T is padded with zeros at the end to N * C tokens; every op reads zero inputs as a token that leaves its state
    alone.
    """
    out = []
    for x in tensors:
        B, T, H = x.shape[:3]
        pad = (-T) % chunk_size
        # F.pad's widths run from the last dimension back: none on the feature dimensions, `pad` after T.
        x = F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, pad))
        out.append(x.view(B, (T + pad) // chunk_size, chunk_size, *x.shape[2:]).movedim(3, 1))
    return out


def merge_chunks(outputs: Sequence[torch.Tensor], T: int) -> torch.Tensor:
    """Per-chunk `[B, H, C, V]` outputs, in order -> `[B, T, H, V]` (the padding past T dropped)."""
    B, H, C, V = outputs[0].shape
    return torch.stack(outputs, 2).permute(0, 2, 3, 1, 4).reshape(B, len(outputs) * C, H, V)[:, :T]
