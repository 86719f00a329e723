"""Supported architecture families: their config, causal-LM and attention classes.

A model converts only if its `model_type` is registered here; anything else is refused with the list of
supported types. Each entry names the exact attention class to swap, so no substring matching on names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import LinearizeError


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        model_type: the transformers `model_type` (e.g. "llama").
        module: the transformers modeling module that defines the classes.
        config_class: name of the config class.
        causal_lm_class: name of the *ForCausalLM class.
        attention_class: name of the softmax attention module to replace.
        notes: what is particular about the family (shown by `linearize models`).
    """

    model_type: str
    module: str
    config_class: str
    causal_lm_class: str
    attention_class: str
    notes: str = ""

    def _load(self, name: str):
        return getattr(importlib.import_module(self.module), name)

    @property
    def config_cls(self):
        return self._load(self.config_class)

    @property
    def causal_lm_cls(self):
        return self._load(self.causal_lm_class)

    @property
    def attention_cls(self):
        return self._load(self.attention_class)

    @property
    def linearized_type(self) -> str:
        return f"linearized_{self.model_type}"


def _family(model_type, package, stem, config_class=None, notes=""):
    return Family(
        model_type=model_type,
        module=f"transformers.models.{package}.modeling_{package}",
        config_class=config_class or f"{stem}Config",
        causal_lm_class=f"{stem}ForCausalLM",
        attention_class=f"{stem}Attention",
        notes=notes,
    )


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _family("llama", "llama", "Llama", notes="Llama 2/3.x, SmolLM2; GQA, llama3 RoPE scaling"),
        _family("mistral", "mistral", "Mistral", notes="GQA; config sliding window ignored once linearized"),
        _family("qwen2", "qwen2", "Qwen2", notes="Qwen2/2.5; q/k/v biases"),
        _family("qwen3", "qwen3", "Qwen3", notes="q/k RMS norms before RoPE"),
        _family(
            "gemma2",
            "gemma2",
            "Gemma2",
            notes="logit soft-capping on the window scores; local layers kept unless convert_sliding_layers",
        ),
        _family(
            "gemma3_text",
            "gemma3",
            "Gemma3",
            config_class="Gemma3TextConfig",
            notes="q/k norms, local RoPE on local layers; local layers kept unless convert_sliding_layers",
        ),
        _family("phi3", "phi3", "Phi3", notes="fused qkv projection, partial rotary"),
    )
}


def family_for(config) -> Family:
    """The family of a (teacher) config, or a clear error naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise LinearizeError(f"architecture '{model_type}' is not supported; supported model types: {', '.join(FAMILIES)}")
