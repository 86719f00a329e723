"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# Gemma-style models alternate local (sliding) and global layers.
LOCAL_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
        sliding_window=6, layer_types=LOCAL_GLOBAL,
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=6, layer_types=LOCAL_GLOBAL,
    ),
    "phi3": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    """A random-weight causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def randomise_new_parameters(model, seed: int = 1) -> None:
    """Move the conversion's new parameters off their identity start, so tests see them travel."""
    from linearize.attention import HybridLinearAttention

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HybridLinearAttention):
                for p in module.new_parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
