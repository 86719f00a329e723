"""Sharding the frozen weights across processes (FSDP2), and gathering them back for export.

Teacher and student share their leaf modules, so sharding is applied to the leaves themselves: each Linear and
Embedding becomes an FSDP unit that gathers its weight just before it runs and frees it after, whichever tree
calls it. The trainable parameters (feature maps, window weights, LoRA adapters) are small; they stay replicated
and their gradients are averaged like in plain data parallelism, so results match the unsharded run.
"""

from __future__ import annotations

import torch
from torch import nn


def shard_frozen_weights(model: nn.Module, device: torch.device) -> int:
    """Shard every Linear and Embedding of `model` across the process group; returns how many were sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    tied = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_ = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if output is not None and input_ is not None and output.weight is input_.weight:
        # A tied head shares its weight with the embedding; sharding the embedding alone keeps the tie intact.
        tied.add(id(output))
    count = 0
    for module in list(model.modules()):
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in tied:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
            count += 1
    if tied and input_ is not None:
        output.weight = input_.weight
    return count


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` gathered to full size on CPU (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().cpu()
    return state
