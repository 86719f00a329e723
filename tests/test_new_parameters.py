"""New parameters start deterministically and survive every load path."""

import torch
from tiny_models import randomise_new_parameters, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize.attention import HybridLinearAttention
from linearize.models.hf import MODEL_CLASSES

ATTN = AttentionConfig(kind="lolcats", window=8, feature_dim=8, init_window_factor=-1.5)


def _new_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "feature_map" in n or "window_factors" in n}


def _assert_at_start(model):
    params = _new_params(model)
    assert params, "no new parameters found"
    for name, p in params.items():
        if name.endswith("window_factors"):
            torch.testing.assert_close(p, torch.full_like(p, -1.5))
        else:
            eye = torch.eye(p.shape[1], p.shape[2]).expand_as(p)
            torch.testing.assert_close(p, eye, rtol=0, atol=0)


def test_conversion_start_is_deterministic_and_identity():
    a = convert(tiny_model("llama", seed=0), ATTN)
    b = convert(tiny_model("llama", seed=5), ATTN)
    _assert_at_start(a)
    for (na, pa), (nb, pb) in zip(_new_params(a).items(), _new_params(b).items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_trained_values_survive_save_and_load(tmp_path):
    model = convert(tiny_model("qwen3"), ATTN)
    randomise_new_parameters(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, p), q in zip(_new_params(model).items(), _new_params(loaded).values(), strict=True):
        assert torch.equal(p, q), name


def test_from_config_starts_deterministically():
    model = convert(tiny_model("phi3"), ATTN)
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert sum(isinstance(m, HybridLinearAttention) for m in fresh.modules()) == 4
    _assert_at_start(fresh)


def test_teacher_checkpoint_into_converted_skeleton(tmp_path):
    teacher = tiny_model("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    converted = convert(tiny_model("llama"), ATTN)
    cls = MODEL_CLASSES["llama"]
    skeleton, info = cls.from_pretrained(tmp_path / "teacher", config=converted.config, output_loading_info=True)
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert all("feature_map" in k or "window_factors" in k for k in info["missing_keys"])
    _assert_at_start(skeleton)
    # The teacher's own weights arrive untouched.
    torch.testing.assert_close(
        skeleton.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight
    )
