"""fla's gated delta rule kernels (`fla-core`), behind the same shape contract as the PyTorch paths.

fla is imported only when this path runs. Its ops take q/k with H heads and v, g, beta with H heads too (the
dispatcher expands GQA first), g as per-step natural-log decays (it converts to base 2 inside), a float32 state in
the default [N, H, K, V] layout (`state_v_first=False` in both the chunk and the recurrent op, so a prefill's state
continues in decoding), `scale` applied after the in-kernel l2 norm. As fla's layers do, short inputs without
gradients (decoding) take the fused recurrent kernel.

fla refuses the chunk op's backward on Hopper GPUs with Triton >= 3.4 and < 3.7.1 unless tilelang is installed
(wrong gradients in `chunk_bwd_dqkwg`, fla issue #640); `backward_blocked` tells the dispatcher beforehand.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch

from ..gla.fla_path import RECURRENT_MAX_TOKENS

# Arguments of the pinned fla ops that this path passes by name (`tests/kernels/test_delta.py` checks them).
CHUNK_ARGS = ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel",
              "state_v_first", "cu_seqlens")  # fmt: skip
FUSED_RECURRENT_ARGS = CHUNK_ARGS
# Triton versions whose gated chunk backward fla refuses on Hopper (fla/ops/common/chunk_o.py).
BAD_TRITON = (">=3.4.0", "<3.7.1")


@functools.cache
def backward_blocked(device_index: int) -> bool:
    """Whether fla's chunk backward refuses to run on this CUDA device: a Hopper GPU, a Triton in BAD_TRITON, and
    no TileLang backend that fla would take instead (installed, with nvcc, not switched off by FLA_TILELANG=0)."""
    if torch.cuda.get_device_capability(device_index)[0] != 9 or not _bad_triton():
        return False
    try:
        from fla.ops.common.backends.tilelang import TileLangBackend
    except ImportError:
        return importlib.util.find_spec("tilelang") is None
    return not (TileLangBackend.is_available() and TileLangBackend.is_enabled())


def _bad_triton() -> bool:
    try:
        # fla's own flags, where this version has them.
        from fla.utils import TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

        return TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
    except ImportError:
        from packaging.specifiers import SpecifierSet

        try:
            return importlib.metadata.version("triton") in SpecifierSet(",".join(BAD_TRITON))
        except importlib.metadata.PackageNotFoundError:
            return False


def gated_delta_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule on fla's kernels.

    Args:
        q, k: `[B, T, H, K]` (B = 1 with `cu_seqlens`).
        v: `[B, T, H, V]`.
        g: `[B, T, H]` log decays (<= 0), float32.
        beta: `[B, T, H]` write strengths.
        scale: multiplies q (after the l2 norm).
        initial_state: `[N, H, K, V]` float32.
        output_final_state: return the state after these tokens.
        cu_seqlens: `[N + 1]` offsets of packed sequences.
        qk_l2norm: l2-normalise q and k inside the kernel.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` float32 state or None).
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.float()
    q, k, beta = q.to(v.dtype), k.to(v.dtype), beta.to(v.dtype)
    short = q.shape[1] <= RECURRENT_MAX_TOKENS and not needs_grad
    run = fused_recurrent_gated_delta_rule if short else chunk_gated_delta_rule
    return run(
        q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=qk_l2norm, state_v_first=False,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = ["CHUNK_ARGS", "FUSED_RECURRENT_ARGS", "backward_blocked", "gated_delta_fla"]
