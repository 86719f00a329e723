"""The one module swap: replace a decoder's softmax attention modules with the recipe's attention kind.

`convert` works in place on a loaded teacher (no copy of the weights): it swaps the attention modules, turns the
config into the family's `Linearized<X>Config` with the conversion settings in its `linearize` field, and the model
into `Linearized<X>ForCausalLM`, so `save_pretrained` writes a folder that reloads with `from_pretrained`.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import AttentionConfig, to_dict
from ..errors import LinearizeError
from .families import family_for
from .hf import CONFIG_CLASSES, MODEL_CLASSES, auto_map_for, is_linearized
from .swap import swap_attention

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1


def _is_local_layer(config, layer_idx: int) -> bool:
    """True for layers that already attend to a local window in a model that mixes local and global layers."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types or "full_attention" not in layer_types:
        return False
    return layer_types[layer_idx] == "sliding_attention"


def plan_layers(config, attention: AttentionConfig) -> dict[str, str]:
    """Attention kind of every layer, as `{"0": "lolcats", "1": "softmax", ...}`.

    Layers listed in `attention.softmax_layers` stay softmax; so do already-local layers of models that mix local
    and global attention (Gemma 2/3) unless `attention.convert_sliding_layers` is set.
    """
    n_layers = config.num_hidden_layers
    bad = [i for i in attention.softmax_layers if i >= n_layers]
    if bad:
        raise LinearizeError(f"attention.softmax_layers has {bad}, but the model has layers 0..{n_layers - 1}")
    plan = {}
    for idx in range(n_layers):
        keep = idx in attention.softmax_layers or (
            _is_local_layer(config, idx) and not attention.convert_sliding_layers
        )
        plan[str(idx)] = "softmax" if keep else attention.kind
    return plan


def convert(model: nn.Module, attention: AttentionConfig, base_model: str | None = None) -> nn.Module:
    """Convert a loaded causal LM in place and return it.

    Args:
        model: a transformers `*ForCausalLM` of a supported family (see `linearize models`).
        attention: which attention kind, where, and its settings.
        base_model: where the teacher came from, recorded in the settings and the model card.

    Returns:
        The same object, now a `Linearized<X>ForCausalLM`.
    """
    if is_linearized(model):
        raise LinearizeError("this model is already converted; load the original checkpoint to convert again")
    config = model.config
    family = family_for(config)
    if not isinstance(model, family.causal_lm_cls):
        raise LinearizeError(
            f"expected a {family.causal_lm_class}, got {type(model).__name__}; load the model with AutoModelForCausalLM"
        )
    settings = {
        "version": SETTINGS_VERSION,
        "family": family.model_type,
        "base_model": base_model,
        "attention": to_dict(attention),
        "layers": plan_layers(config, attention),
    }
    replaced = swap_attention(model, settings)
    if not replaced:
        logger.warning("no attention layer was converted: every layer is kept as softmax")
    config_cls, model_cls = CONFIG_CLASSES[family.model_type], MODEL_CLASSES[family.model_type]
    config.__class__ = config_cls
    config.linearize = settings
    config.auto_map = auto_map_for(config_cls, model_cls)
    config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
    logger.info("converted %d of %d attention layers to %s", len(replaced), config.num_hidden_layers, attention.kind)
    return model
