"""A student that shares every weight with its teacher: copy the module tree, not the tensors.

`shallow_twin` copies each container module (the model, its layers, attention and MLP blocks) and shares every
leaf (Linear, Embedding, norms, rotary embedding), so teacher and student hold one copy of the weights between
them. Converting the twin swaps its attention modules only; adding LoRA to the twin wraps its own containers'
projections only; the teacher keeps computing the original model throughout training.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn


def _copy_container(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    if not module._modules:
        memo[id(module)] = module
        return module
    twin = copy.copy(module)
    memo[id(module)] = twin
    twin.__dict__ = dict(module.__dict__)
    twin._parameters = OrderedDict(module._parameters)
    twin._buffers = OrderedDict(module._buffers)
    twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    # Hooks registered on the twin later must not fire on the teacher.
    for name, value in module.__dict__.items():
        if "hook" in name and isinstance(value, dict):
            twin.__dict__[name] = OrderedDict(value)
    twin._modules = OrderedDict(
        (name, _copy_container(child, memo) if child is not None else None) for name, child in module._modules.items()
    )
    return twin


def shallow_twin(model: nn.Module) -> nn.Module:
    """A structural copy of `model` sharing all parameters and buffers, with its own (deep-copied) config."""
    memo: dict = {}
    twin = _copy_container(model, memo)
    old_config = getattr(model, "config", None)
    if old_config is not None:
        new_config = copy.deepcopy(old_config)
        for original_id, module in memo.items():
            # Shared leaves keep the teacher's config; copied containers get the twin's.
            if id(module) != original_id and module.__dict__.get("config") is old_config:
                module.config = new_config
    return twin
