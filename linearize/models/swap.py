"""The module swap itself: replace a model's softmax attention modules as its conversion settings say.

Both conversion (`convert.py`, on a loaded teacher) and the registered classes (`hf.py`, when `from_pretrained`
rebuilds an exported folder) call `swap_attention`; it lives apart from both so that neither imports the other
back.
"""

from __future__ import annotations

from torch import nn

from ..attention import get_attention_kind
from ..attention.registry import KIND_ATTR
from ..config import AttentionConfig, from_dict
from ..errors import LinearizeError
from .families import FAMILIES


def family_for_settings(settings: dict):
    """The family that conversion settings name."""
    family = FAMILIES.get(settings.get("family"))
    if family is None:
        raise LinearizeError(f"conversion settings name an unknown family '{settings.get('family')}'")
    return family


def swap_attention(model: nn.Module, settings: dict) -> list[str]:
    """Replace the family's attention modules as `settings["layers"]` says; returns the names replaced."""
    attention_cls = family_for_settings(settings).attention_cls
    attention = from_dict(AttentionConfig, settings["attention"])
    plan = settings["layers"]
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not attention_cls:
            continue
        kind = get_attention_kind(plan[str(module.layer_idx)])
        if kind.build is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        built = kind.build(module, attention, module.layer_idx)
        setattr(built, KIND_ATTR, kind.name)
        setattr(model.get_submodule(parent_name), child_name, built)
        replaced.append(name)
    return replaced
