"""fla's gated linear attention kernels (`fla-core`), behind the same shape contract as the PyTorch paths.

fla is imported only when this path runs, so the package works without it. fla's GLA ops take the same number of
heads in q, k, v and g (the dispatcher expands GQA first), a float32 state, and switch to the fused recurrent
kernel for short inputs without gradients (decoding), as fla's own layers do below 65 tokens.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch

# The fla-core versions whose signatures `tests/kernels/test_gla.py` checks; `pyproject.toml`'s `gpu` extra pins them.
FLA_VERSIONS = ">=0.6.0,<0.7"
# fla's layers run the fused recurrent kernel up to this many new tokens.
RECURRENT_MAX_TOKENS = 64
# Arguments of the pinned fla ops that this path passes by name.
CHUNK_GLA_ARGS = ("q", "k", "v", "g", "scale", "initial_state", "output_final_state", "cu_seqlens")
FUSED_RECURRENT_GLA_ARGS = ("q", "k", "v", "gk", "scale", "initial_state", "output_final_state", "cu_seqlens")


@functools.cache
def fla_version() -> str | None:
    """Installed fla-core version, None without it (read from metadata: importing fla costs seconds)."""
    if importlib.util.find_spec("fla") is None:
        return None
    try:
        return importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        import fla

        return getattr(fla, "__version__", "0")


def gla_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention on fla's kernels.

    Args:
        q, k: `[B, T, H, K]` (B = 1 with `cu_seqlens`).
        v: `[B, T, H, V]`.
        g: `[B, T, H, K]` log decays (<= 0), float32.
        scale: multiplies q.
        initial_state: `[N, H, K, V]` float32.
        output_final_state: return the state after these tokens.
        cu_seqlens: `[N + 1]` offsets of packed sequences.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` float32 state or None).
    """
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.float()
    k, q = k.to(v.dtype), q.to(v.dtype)
    if q.shape[1] <= RECURRENT_MAX_TOKENS and not needs_grad:
        return fused_recurrent_gla(
            q=q, k=k, v=v, gk=g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    return chunk_gla(
        q=q, k=k, v=v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
