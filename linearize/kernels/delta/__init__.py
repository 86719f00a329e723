"""The gated delta rule (Gated DeltaNet): scalar decay and write strength per head, GQA, packed sequences.

`gated_delta_rule` is the entry point the `gdn` kind calls; `naive.py` is the ground truth. On CUDA tensors it runs
fla's Triton kernels when `fla-core` is installed (`fla_path.py`); elsewhere the chunked PyTorch path (`chunk.py`)
for training and prefill and the step-by-step one (`recurrent.py`) for decoding. `LINEARIZE_KERNELS` overrides the
choice as for the other ops: `torch` forces PyTorch, `triton` requires fla. Where fla would refuse its backward
(Hopper with an affected Triton, see `fla_path.py`), a call that needs gradients takes the PyTorch path and says
once what to install.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...errors import LinearizeError
from ..common import torch_path
from ..gla.fla_path import FLA_VERSIONS, fla_version
from ..gla.naive import expand_heads
from ..hybrid import ENV_VAR, kernel_choice
from .chunk import gated_delta_chunk_torch
from .fla_path import BAD_TRITON, backward_blocked, gated_delta_fla
from .naive import gated_delta_naive, l2norm
from .recurrent import gated_delta_recurrent_torch

logger = logging.getLogger(__name__)

FIX = "pip install 'triton>=3.7.1' or pip install tilelang"


def _torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm, chunk_size):
    if qk_l2norm:
        q, k = l2norm(q.float()), l2norm(k.float())
    return torch_path(gated_delta_recurrent_torch, gated_delta_chunk_torch, (q, k, v, g, beta), scale, initial_state,
                      output_final_state, cu_seqlens, chunk_size)  # fmt: skip


def _fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm, chunk_size):
    return gated_delta_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm)


BACKENDS = {"torch": _torch, "fla": _fla}


@functools.cache
def _warn(message: str) -> None:
    logger.warning(message)


def delta_backend(q: torch.Tensor, needs_grad: bool = False) -> str:
    """Which path `gated_delta_rule` takes for `q` (and whether gradients are wanted): `fla` or `torch`."""
    choice = kernel_choice()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if fla_version() is None:
            raise LinearizeError(
                f"{ENV_VAR}=triton but fla-core (the gated delta rule's kernels) is not installed: "
                f"pip install 'fla-core{FLA_VERSIONS}', or unset {ENV_VAR}"
            )
        if not q.is_cuda:
            raise LinearizeError(
                f"{ENV_VAR}=triton: fla's gated delta kernels need CUDA tensors; unset {ENV_VAR} on CPU"
            )
        if needs_grad and backward_blocked(q.device.index or 0):
            raise LinearizeError(
                f"fla's gated delta rule backward refuses Hopper GPUs with Triton {','.join(BAD_TRITON)}: {FIX}, "
                f"or unset {ENV_VAR} to train on the PyTorch path"
            )
        return "fla"
    if not q.is_cuda:
        return "torch"
    if fla_version() is None:
        _warn(f"fla-core is not installed: the gated delta rule runs on PyTorch (pip install 'fla-core{FLA_VERSIONS}')")
        return "torch"
    if needs_grad and backward_blocked(q.device.index or 0):
        _warn(f"fla's gated delta rule backward refuses this GPU's Triton: training takes the PyTorch path ({FIX})")
        return "torch"
    return "fla"


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a block of new tokens, continuing from `initial_state` (see naive.py).

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, Hkv, K]` keys; H must be a multiple of Hkv (GQA).
        v: `[B, T, Hkv, V]` values.
        g: `[B, T, Hg]` per-step log decays (<= 0), Hg = H or Hkv.
        beta: `[B, T, Hg]` write strengths in [0, 1].
        scale: multiplies q (after the l2 norm); default `K ** -0.5`.
        initial_state: `[N, H, K, V]` fp32 state before these tokens; None starts from zeros.
        output_final_state: return the state after these tokens.
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1); each attends only to itself.
        token_mask: `[B, T]` bool, False for padding tokens, which neither write to the state nor decay it.
        qk_l2norm: l2-normalise q and k first (in fla's kernel on that path).
        chunk_size: tokens per chunk of the PyTorch path (default 64, as fla); fla uses its own.

    Returns:
        `([B, T, H, V]` output in the dtype of v, `[N, H, K, V]` fp32 final state or None).
    """
    H, K = q.shape[2], q.shape[-1]
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {q.shape[0]}")
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    k, v = expand_heads(k, H), expand_heads(v, H)
    g, beta = (expand_heads(x[..., None], H)[..., 0] for x in (g.float(), beta))
    if token_mask is not None:
        keep = token_mask[:, :, None]
        k, g = k * keep[..., None].to(k.dtype), g * keep.to(g.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
    backend = BACKENDS[delta_backend(q, needs_grad)]
    o, state = backend(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, qk_l2norm, chunk_size)
    return o.to(dtype), state


__all__ = [
    "BACKENDS",
    "delta_backend",
    "gated_delta_chunk_torch",
    "gated_delta_naive",
    "gated_delta_recurrent_torch",
    "gated_delta_rule",
    "l2norm",
]
