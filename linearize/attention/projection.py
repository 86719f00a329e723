"""Query/key/value projection shared by every converted attention, whatever the architecture family.

The converted module adopts the original module's children under their own names (q_proj/k_proj/v_proj/o_proj,
or Phi-3's fused qkv_proj, plus Qwen3/Gemma3 q_norm/k_norm), so teacher checkpoints load strictly and LoRA
targets still match. RoPE is applied with the architecture's own `apply_rotary_pos_emb`, which carries each
family's variant (partial rotary for Phi-3, for example).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def rope_function(original: nn.Module):
    """The `apply_rotary_pos_emb` of the modeling module that defines `original`'s class."""
    fn = getattr(sys.modules[type(original).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(original).__name__}: its modeling module has no apply_rotary_pos_emb")
    return fn


def project_qkv(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rotate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project, normalise and (unless `rotate` is False) rotate as the original attention does.

    Args:
        module: a converted attention module holding the original projections.
        hidden_states: `[B, T, hidden]`.
        position_embeddings: `(cos, sin)` from the model's rotary embedding.

    Returns:
        q `[B, T, H, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, D]`, q and k after norms and RoPE.
    """
    B, T, _ = hidden_states.shape
    D = module.head_dim
    if hasattr(module, "qkv_proj"):
        qkv = module.qkv_proj(hidden_states)
        q_size, kv_size = module.num_heads * D, module.num_kv_heads * D
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    else:
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    q = q.view(B, T, -1, D)
    k = k.view(B, T, -1, D)
    v = v.view(B, T, -1, D)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    if hasattr(module, "k_norm"):
        k = module.k_norm(k)
    if rotate:
        q, k = rotate_qk(module, q, k, position_embeddings)
    return q, k, v


def rotate_qk(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The architecture's RoPE (`module.rope`) on q `[B, T, H, D]` and k `[B, T, Hkv, D]`, whatever subset of
    heads they hold."""
    cos, sin = position_embeddings
    q, k = module.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)
