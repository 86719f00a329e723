"""Registered Hugging Face classes for converted models: `Linearized<X>Config` and `Linearized<X>ForCausalLM`.

Each is a thin subclass of the family's own class. The config adds a plain-dict `linearize` field (the
conversion settings) and its own `model_type`; the model's `__init__` builds the family model and then swaps the
attention modules the settings name, so `from_pretrained` on an exported folder rebuilds the same structure and
loads every weight strictly. Importing this module registers the classes with the Auto classes; exported folders
also carry `modeling_linearize.py`, an `auto_map` and a copy of the attention code (`bundle.py`), so
`trust_remote_code=True` loads them where linearize is not installed.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM

from .. import _compat
from ..attention import TOKEN_MASK_KWARG, LinearizeCache, reset_missing_new_parameters
from .bundle import MODELING_FILE as REMOTE_CODE_FILE
from .bundle import write_code
from .families import FAMILIES, Family
from .swap import swap_attention

CONFIG_CLASSES: dict[str, type] = {}
MODEL_CLASSES: dict[str, type] = {}


class LinearizedModelMixin:
    """Behaviour shared by every `Linearized<X>ForCausalLM`: conversion on build, recurrent cache, export."""

    def _linearize_init(self) -> None:
        swap_attention(self, self.config.linearize)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Parameters missing from a checkpoint (loading a teacher into a converted skeleton) come back from
        # transformers uninitialised; ours have a deterministic start that is restored here.
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        reset_missing_new_parameters(model, info.get("missing_keys", ()))
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own LinearizeCache in forward; generate must not hand it a plain DynamicCache.
        return False

    def forward(self, *args, **kwargs):
        # Positional arguments follow the family's own forward signature (input_ids, attention_mask, ...).
        names = list(inspect.signature(super().forward).parameters)
        kwargs.update(zip(names, args, strict=False))
        input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        cache = _compat.pop_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.config.use_cache
        if cache is not None and not isinstance(cache, LinearizeCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    "linearized models need a linearize.LinearizeCache; this cache already holds tokens of type "
                    f"{type(cache).__name__}. Pass no cache and let the model create one."
                )
            cache = None
        if cache is None and use_cache:
            cache = LinearizeCache(self.config)
        if cache is not None:
            kwargs[_compat.CACHE_KWARG] = cache
        if attention_mask is not None and attention_mask.dim() == 2:
            n_new = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            kwargs[TOKEN_MASK_KWARG] = attention_mask[:, -n_new:].bool()
        outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if use_cache and _compat.output_cache(outputs) is None:
            _compat.set_output_cache(outputs, cache)
        return outputs

    @classmethod
    def is_remote_code(cls) -> bool:
        # save_pretrained writes the modeling file and the code it needs; transformers' own copy of the module that
        # defined the class (after a remote-code load) would not load.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        config_cls, model_cls = type(self.config), type(self)
        # A model loaded by remote code (or from a Hub repo, whose auto_map names the repo) saves the folder's own
        # modeling file and copy of the code, never transformers' copy of the module that defined its class.
        self.config.auto_map = auto_map_for(config_cls, model_cls)
        self.config._auto_class = None
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self.config._auto_class
        write_code(Path(save_directory), config_cls.__name__, model_cls.__name__)


def _make_classes(family: Family) -> tuple[type, type]:
    base_config, base_model = family.config_cls, family.causal_lm_cls
    stem = base_model.__name__.removesuffix("ForCausalLM")
    config_name, model_name = f"Linearized{stem}Config", f"Linearized{stem}ForCausalLM"

    config_cls = strict(
        type(
            config_name,
            (base_config,),
            {
                "__module__": __name__,
                "__annotations__": {"linearize": dict | None},
                "model_type": family.linearized_type,
                "linearize": None,
                "__doc__": f"{base_config.__name__} plus the conversion settings of linearize (`linearize` field).",
            },
        )
    )

    def __init__(self, config):
        base_model.__init__(self, config)
        self._linearize_init()

    def forward(self, *args, **kwargs):
        return LinearizedModelMixin.forward(self, *args, **kwargs)

    # generate() reads the forward signature (e.g. to decide whether to build position_ids from the mask).
    forward.__signature__ = inspect.signature(base_model.forward)
    forward.__doc__ = base_model.forward.__doc__

    model_cls = type(
        model_name,
        (LinearizedModelMixin, base_model),
        {
            "forward": forward,
            "__module__": __name__,
            "config_class": config_cls,
            "__init__": __init__,
            "__doc__": f"{base_model.__name__} with its attention converted by linearize.",
        },
    )
    return config_cls, model_cls


def auto_map_for(config_cls: type, model_cls: type) -> dict[str, str]:
    stem = REMOTE_CODE_FILE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.{config_cls.__name__}", "AutoModelForCausalLM": f"{stem}.{model_cls.__name__}"}


def _register_all() -> None:
    for family in FAMILIES.values():
        config_cls, model_cls = _make_classes(family)
        CONFIG_CLASSES[family.model_type] = config_cls
        MODEL_CLASSES[family.model_type] = model_cls
        globals()[config_cls.__name__] = config_cls
        globals()[model_cls.__name__] = model_cls
        AutoConfig.register(family.linearized_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


_register_all()


def is_linearized(model: torch.nn.Module) -> bool:
    return isinstance(model, LinearizedModelMixin)
