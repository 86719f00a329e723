"""Head-level hybrids of the recurrent kinds (`gdn` and the gated kinds): kept key/value heads are the teacher's
softmax attention, the others the kind's op with new parameters for those heads only; decoding, the cache size, the
refusal of kinds that cannot split heads, and the bundled `gdn-retrieval` recipe end to end. Packing and left padding
are checked with the other kinds in `test_gated_kinds.py` (`*-heads`), export and reload in `test_export_bundle.py`
(`gdn+heads`, `lizard+heads`). The Hedgehog family's head split is in `test_heads.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from kind_checks import (
    attention_config,
    converted,
    decode_equals_full,
    layer_inputs,
    perturb,
    token_ids,
    write_corpus,
)
from tiny_models import save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize.attention import LinearizeCache, converted_modules
from linearize.attention.footprint import cache_bytes_at
from linearize.attention.gated import GatedState
from linearize.attention.gdn import DeltaState
from linearize.attention.heads import SoftmaxHeadsState
from linearize.config import from_dict, load_recipe, to_dict
from linearize.errors import LinearizeError
from linearize.train.pipeline import run_pipeline

OPTIONS = {"conv_kernel": 4, "rope": True}
# Each kind with its new parameters as varied as it has them: conv, RoPE, window, sinks, gates.
NAMES = ["gdn-conv-rope", "gla", "liger", "lizard", "lawcat"]
# The kinds that keep softmax heads, as the refusal names them.
CAN = "gdn, gla, hedgehog, lawcat, liger, lizard, lolcats"
STATES = {
    "gdn-conv-rope": DeltaState,
    "gla": GatedState,
    "liger": GatedState,
    "lizard": GatedState,
    "lawcat": GatedState,
}


def _o_proj_inputs(model, layer: int, ids) -> torch.Tensor:
    """What layer `layer`'s o_proj receives over `ids`: the per-head attention output `[B, T, H * D]`."""
    seen = []
    o_proj = model.model.layers[layer].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize(
    "name,family", [*(("gdn-conv-rope", f) for f in ("llama", "gemma2", "qwen3")), *((n, "llama") for n in NAMES[1:])]
)
def test_kept_heads_are_the_teachers_attention(name, family):
    teacher = tiny_model(family)
    n_layers, D = teacher.config.num_hidden_layers, teacher.config.head_dim
    groups = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    # Layer 1 is converted in every family; every other layer stays softmax, so layer 1 sees the teacher's input.
    others = [i for i in range(n_layers) if i != 1]
    student = convert(tiny_model(family), attention_config(name, softmax_layers=others, softmax_heads={"1": [1]}))
    perturb(student)
    ids = token_ids(2, 13)
    want, got = _o_proj_inputs(teacher, 1, ids), _o_proj_inputs(student, 1, ids)
    kept = slice(groups * D, 2 * groups * D)
    torch.testing.assert_close(got[..., kept], want[..., kept], rtol=1e-4, atol=1e-5)
    # The linear heads are not the teacher's: the split really runs two ops.
    assert (got[..., : groups * D] - want[..., : groups * D]).abs().max() > 1e-3


def _linear_slices(module) -> dict[str, torch.Tensor]:
    """Per new parameter of an all-linear module, the index along dim 0 (dim 1 for the conv) of what a module keeping
    kv head 0 of the tiny llama (query heads 0, 1) holds: query heads 2, 3 and kv head 1."""
    D = module.head_dim
    heads = torch.tensor([2, 3])

    def rows(width):
        return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])

    H, Hkv = module.num_heads, module.num_kv_heads
    conv = torch.cat([rows(D), H * D + torch.arange(D, 2 * D), (H + Hkv) * D + torch.arange(D, 2 * D)])
    per_head = ["A_log", "dt_bias", "a_proj.weight", "b_proj.weight", "b_proj.bias", "sinks", "gate.proj.weight",
                "gate.proj.bias", "feature_map_q.weight", "feature_map_k.weight"]  # fmt: skip
    slices = dict.fromkeys(per_head, heads) | {"g_proj.weight": rows(D), "g_proj.bias": rows(D), "conv.weight": conv}
    if hasattr(module, "gate") and hasattr(module.gate, "up"):
        slices |= {"gate.up.weight": rows(module.gate.channels), "gate.up.bias": rows(module.gate.channels)}
    new = module.named_new_parameters()
    # Shared by the heads: the whole tensor.
    slices |= {name: torch.arange(new[name].shape[0]) for name in ("o_norm.weight", "gate.down.weight") if name in new}
    return {name: slices[name] for name in new if name in slices}


def _take(p, index, name):
    return p.index_select(1 if name == "conv.weight" else 0, index)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("name", ["gdn-conv-rope", "lizard", "lawcat"])
def test_linear_heads_are_the_plain_op_on_their_heads_with_its_gradients(name, packed):
    plain_model = converted(name)
    perturb(plain_model)
    plain = converted_modules(plain_model)[1]
    split = converted_modules(converted(name, softmax_heads={"1": [0]}))[1]
    slices = _linear_slices(plain)
    assert sorted(split.named_new_parameters()) == sorted(slices)
    with torch.no_grad():
        for name, p in split.named_new_parameters().items():
            p.copy_(_take(plain.get_parameter(name), slices[name], name))
    B, T = (1, 13) if packed else (2, 13)
    hidden, pe = layer_inputs(T=T, B=B)
    cu = torch.tensor([0, 6, 13]) if packed else None
    got = split.attention_heads(hidden, pe, cu_seqlens=cu).view(B, T, 4, -1)[:, :, 2:]
    want = plain.attention_heads(hidden, pe, cu_seqlens=cu).view(B, T, 4, -1)[:, :, 2:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    for name, p in split.named_new_parameters().items():
        torch.testing.assert_close(p.grad, _take(plain.get_parameter(name).grad, slices[name], name), rtol=1e-4,
                                   atol=1e-6, msg=lambda text, name=name: f"{name}: {text}")  # fmt: skip


def test_gdn_new_parameters_cover_the_linear_heads_only():
    model = converted("gdn", options=OPTIONS, softmax_heads={"1": [1], "2": [0, 1]})
    modules = converted_modules(model)
    shapes = {n: tuple(p.shape) for n, p in modules[1].named_new_parameters().items()}
    assert shapes["a_proj.weight"] == (2, 64) and shapes["g_proj.weight"] == (32, 64)
    # q of two query heads, k and v of one kv head, 16 channels each.
    assert shapes["conv.weight"] == (4, 64)
    # Every head kept: nothing to train, no conv.
    assert all(p.numel() == 0 for n, p in modules[2].named_new_parameters().items() if n != "o_norm.weight")
    assert not hasattr(modules[2], "conv")
    assert modules[0].a_proj.weight.shape == (4, 64)


@pytest.mark.parametrize("name", NAMES)
def test_decoding_equals_the_full_forward_and_the_cache_is_what_the_footprint_says(name):
    model = converted(name, softmax_heads={"1": [1], "2": [0, 1]})
    perturb(model)
    cache = decode_equals_full(model, token_ids(2, 11))
    state = cache.recurrent_layer(1).state
    assert isinstance(state, SoftmaxHeadsState) and isinstance(state.linear, STATES[name])
    assert state.linear.tensors()[0].shape[:2] == (2, 2) and state.keys.shape == (2, 11, 1, 16)
    assert cache.recurrent_layer(2).state.linear is None
    assert cache.nbytes() == cache_bytes_at(model.config, 11, batch=2, dtype_bytes=4)["total"]
    generated = LinearizeCache(model.config)
    with torch.no_grad():
        out = model.generate(token_ids(2, 6), max_new_tokens=5, do_sample=False, cache=generated, pad_token_id=0)
        full = model(out, use_cache=False).logits
    assert torch.equal(out[:, 6:], full[:, 5:-1].argmax(-1))
    # 10 tokens went through the cache (the last generated one was never fed back).
    assert generated.nbytes() == cache_bytes_at(model.config, 10, batch=2, dtype_bytes=4)["total"]


def test_a_kind_that_cannot_split_heads_is_refused_with_the_kinds_that_can(monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("the settings must be refused before the probe runs")

    monkeypatch.setattr("linearize.models.choose.retrieval_scores", no_scoring)
    for settings in (dict(softmax_head_budget=0.25), dict(softmax_heads={"1": [0]})):
        with pytest.raises(LinearizeError, match=rf"kind 'rwkv7' cannot keep softmax heads.*\({CAN}\)"):
            AttentionConfig(kind="rwkv7", **settings)
    with pytest.raises(LinearizeError, match="kind 'rwkv7' cannot keep softmax heads") as info:
        load_recipe("lolcats-retrieval", ["attention.kind=rwkv7"])
    assert "\n" not in str(info.value)


def test_the_recipe_cache_arithmetic_on_smollm2():
    """The figures in gdn-retrieval.yaml: 9 of 90 kv heads kept on SmolLM2-135M's shape."""
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64
    )
    attention = load_recipe("gdn-retrieval").attention
    assert round(attention.softmax_head_budget * 30 * 3) == 9
    heads = {str(layer): [0] for layer in range(9)}
    resolved = from_dict(AttentionConfig, to_dict(attention) | {"softmax_head_budget": 0.0, "softmax_heads": heads})
    config.linearize = {"attention": to_dict(resolved), "layers": {str(i): "gdn" for i in range(30)}}
    at_4k, at_32k = cache_bytes_at(config, 4096), cache_bytes_at(config, 32768)
    assert at_4k["layers"]["20"] == 9 * 64 * 64 * 4
    assert at_4k["layers"]["0"] == 6 * 64 * 64 * 4 + 4096 * 128 * 2 + 4096
    assert (round(at_4k["total"] / 1e5), round(at_32k["total"] / 1e5)) == (135, 798)
    assert round(at_4k["ratio"], 3) == 0.143 and round(at_32k["ratio"], 3) == 0.106


def test_the_recipe_runs_end_to_end_and_reloads_with_its_chosen_heads(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    tiny_dir = save_tiny("llama", tmp_path / "tiny")
    sets = [
        *("data.seq_len=16", "transfer.tokens=128", "finetune.tokens=64", "long.tokens=64", "long.seq_len=64"),
        *("run.checkpoint_every=100", "report.enabled=false", f"data.dataset={corpus}"),
        # The tiny model's 8 kv heads: a quarter kept, chosen by a short copy probe.
        *("attention.softmax_head_budget=0.25", "attention.probe.block=16", "attention.probe.samples=2"),
        "attention.chunk_size=4",
    ]
    out = tmp_path / "out"
    run_pipeline(str(tiny_dir), load_recipe("gdn-retrieval", sets), out)
    settings = json.loads((out / "config.json").read_text())["linearize"]
    chosen = settings["selection"]["softmax_heads"]
    assert sum(len(h) for h in chosen.values()) == 2 and settings["attention"]["softmax_heads"] == chosen

    def no_scoring(*args, **kwargs):
        raise AssertionError("a reload must not score the model again")

    monkeypatch.setattr("linearize.models.choose.retrieval_scores", no_scoring)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {str(i): m.split.softmax_kv for i, m in converted_modules(model).items() if m.split} == chosen
    decode_equals_full(model, token_ids(1, 9))
