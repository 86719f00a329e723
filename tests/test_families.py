"""Per architecture: convert a tiny model, save, reload strictly, equal logits, generate."""

import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, VOCAB, randomise_new_parameters, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize.attention import HybridLinearAttention


def _convert(family, kind="lolcats", **kw):
    model = tiny_model(family)
    convert(model, AttentionConfig(kind=kind, window=kw.pop("window", 8), feature_dim=8, **kw))
    randomise_new_parameters(model)
    return model


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_roundtrip_strict_equal_logits_and_generate(family, tmp_path):
    model = _convert(family)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded) is type(model)
    with torch.no_grad():
        after = loaded(ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    out = loaded.generate(
        ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 11)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_local_layers_kept_unless_asked(family):
    kept = _convert(family)
    kinds = [type(layer.self_attn) is HybridLinearAttention for layer in kept.model.layers]
    assert kinds == [False, True, False, True]
    assert kept.config.linearize["layers"] == {"0": "softmax", "1": "lolcats", "2": "softmax", "3": "lolcats"}
    every = _convert(family, convert_sliding_layers=True)
    assert all(type(layer.self_attn) is HybridLinearAttention for layer in every.model.layers)


def test_softmax_layers_stay_softmax():
    model = _convert("llama", softmax_layers=[0, 2])
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LlamaAttention", "HybridLinearAttention", "LlamaAttention", "HybridLinearAttention"]


def test_hedgehog_has_no_window_parameters():
    model = _convert("llama", kind="hedgehog")
    attn = model.model.layers[0].self_attn
    assert attn.window == 0 and not hasattr(attn, "window_factors")
    assert "window_factors" not in " ".join(n for n, _ in model.named_parameters())


def test_fresh_process_trust_remote_code(tmp_path):
    model = _convert("qwen3")
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits[0, -1].argmax().item()
    code = (
        "import torch; from transformers import AutoModelForCausalLM as A;"
        f"m = A.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval();"
        "import sys; assert 'linearize' in type(m).__module__;"
        "print(m(torch.tensor([[5, 6, 7, 8]]), use_cache=False).logits[0, -1].argmax().item())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip().splitlines()[-1]) == expected
