"""fla's RWKV-7 kernels (`fla-core`), behind the same shape contract as the PyTorch paths.

fla is imported only when this path runs. Its ops take the same number of heads everywhere (the dispatcher expands
GQA first), a float32 `[N, H, K, V]` state, and log decays w; `chunk_rwkv7` serves training and prefill,
`fused_recurrent_rwkv7` short inputs without gradients (decoding), as fla's own layer does below 65 tokens. The
scale is always passed: the two ops default to different ones (1 and K ** -0.5).
"""

from __future__ import annotations

import torch

from ..gla.fla_path import RECURRENT_MAX_TOKENS

# Arguments of the pinned fla ops (`gla.fla_path.FLA_VERSIONS`) that this path passes by name.
CHUNK_RWKV7_ARGS = ("r", "w", "k", "v", "a", "b", "scale", "initial_state", "output_final_state", "cu_seqlens")
FUSED_RECURRENT_RWKV7_ARGS = CHUNK_RWKV7_ARGS


def rwkv7_fla(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RWKV-7 recurrence on fla's kernels: `[B, T, H, K]` r, w, k, a, b and `[B, T, H, V]` v (B = 1 with
    `cu_seqlens`), `[N, H, K, V]` float32 state; returns (output in the dtype of v, final state or None)."""
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.float()
    r, k, a, b = (x.to(v.dtype) for x in (r, k, a, b))
    kw = dict(r=r, w=w.float(), k=k, v=v, a=a, b=b, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)  # fmt: skip
    if r.shape[1] <= RECURRENT_MAX_TOKENS and not needs_grad:
        return fused_recurrent_rwkv7(**kw)
    return chunk_rwkv7(**kw)
