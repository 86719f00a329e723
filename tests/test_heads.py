"""Softmax kept where retrieval lives: budgets chosen at conversion, and head-level hybrid attention."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import randomise_new_parameters, tiny_model
from transformers import AutoModelForCausalLM

from linearize.attention import LinearizeCache, converted_modules
from linearize.attention.footprint import cache_bytes_at
from linearize.attention.heads import HeadSplit
from linearize.attention.hybrid import HybridLinearAttention
from linearize.attention.selection import RetrievalScores, select_softmax_heads
from linearize.config import AttentionConfig, ProbeConfig, from_dict
from linearize.errors import LinearizeError
from linearize.models.convert import convert, plan_layers

PROBE = ProbeConfig(block=12, samples=2, seed=3)


def _converted(family="llama", **attention):
    model = tiny_model(family)
    settings = dict(kind="lolcats", window=4, feature_dim=8, probe=PROBE) | attention
    return convert(model, AttentionConfig(**settings))


def _ids(batch=2, length=21, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_budgets_are_chosen_deterministically_and_stored(tmp_path):
    a = _converted(softmax_budget=0.25, softmax_head_budget=0.25)
    b = _converted(softmax_budget=0.25, softmax_head_budget=0.25)
    chosen = a.config.linearize
    assert chosen == b.config.linearize
    record = chosen["selection"]
    # 4 layers x 2 kv heads: one softmax layer, two kept kv heads, none in the softmax layer.
    assert len(record["softmax_layers"]) == 1
    assert sum(len(h) for h in record["softmax_heads"].values()) == 2
    assert str(record["softmax_layers"][0]) not in record["softmax_heads"]
    assert chosen["layers"][str(record["softmax_layers"][0])] == "softmax"
    assert chosen["attention"]["softmax_heads"] == record["softmax_heads"]
    assert len(record["scores"]["heads"]) == 4
    for layer, heads in record["softmax_heads"].items():
        assert converted_modules(a)[int(layer)].split.softmax_kv == heads
    a.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["linearize"]
    assert stored["selection"] == record
    assert stored["attention"]["softmax_budget"] == 0.0 and stored["attention"]["softmax_layers"] == [
        record["softmax_layers"][0]
    ]


def test_head_choice_ranks_kv_groups_by_the_sum_of_their_query_heads():
    heads = torch.tensor([[0.9, 0.0, 0.5, 0.5], [0.0, 0.1, 0.2, 0.0], [0.3, 0.3, 0.0, 0.0]])
    scores = RetrievalScores(heads=heads, block=8, samples=1)
    # Group sums: [0.9, 1.0], [0.1, 0.2], [0.6, 0.0].
    assert select_softmax_heads(scores, 2 / 6, num_kv_heads=2) == {"0": [0, 1]}
    assert select_softmax_heads(scores, 3 / 6, num_kv_heads=2) == {"0": [0, 1], "2": [0]}
    assert select_softmax_heads(scores, 2 / 6, num_kv_heads=2, candidates=[1, 2]) == {"1": [1], "2": [0]}
    assert select_softmax_heads(scores, 0.0, num_kv_heads=2) == {}


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(softmax_budget=0.2, softmax_layers=[1]), "set only one"),
        (dict(softmax_head_budget=0.2, softmax_heads={"1": [0]}), "set only one"),
        (dict(softmax_head_budget=1.5), r"fraction in \[0, 1\]"),
        (dict(softmax_heads={"x": [0]}), "softmax_heads maps layer"),
        (dict(softmax_heads={"1": [0]}, softmax_layers=[1]), "keeps whole"),
    ],
)
def test_contradictory_choices_are_refused(settings, message):
    with pytest.raises(LinearizeError, match=message):
        from_dict(AttentionConfig, settings)


def test_probe_shorter_than_the_window_and_heads_out_of_range_are_refused():
    with pytest.raises(LinearizeError, match="longer than the window"):
        _converted(softmax_head_budget=0.25, probe=ProbeConfig(block=4))
    with pytest.raises(LinearizeError, match="kv heads 0..1"):
        _converted(softmax_heads={"1": [2]})
    with pytest.raises(LinearizeError, match="layer 7, which is not converted"):
        _converted(softmax_heads={"7": [0]})
    # Gemma 2's local layers (0, 2) stay softmax unless converted.
    with pytest.raises(LinearizeError, match="layer 2, which is not converted"):
        _converted("gemma2", softmax_heads={"2": [0]})


def test_a_kind_that_cannot_keep_heads_is_refused():
    from test_kinds import ToyLayer, ToyLinear

    from linearize.attention import ATTENTION_KINDS, AttentionKind, register_attention_kind

    register_attention_kind(AttentionKind("toy-heads", "test kind", False, build=ToyLinear, cache_layer=ToyLayer))
    try:
        with pytest.raises(
            LinearizeError,
            match="'toy-heads' cannot keep softmax heads.*gdn, gla, hedgehog, lawcat, liger, lizard, lolcats",
        ):
            convert(tiny_model("llama"), AttentionConfig(kind="toy-heads", softmax_heads={"1": [0]}))
    finally:
        del ATTENTION_KINDS["toy-heads"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_layers_whose_every_head_is_softmax_equal_the_teacher(family):
    teacher = tiny_model(family)
    n_kv = teacher.config.num_key_value_heads
    # Every converted layer (Gemma 2 keeps its local layers 0 and 2 as they are).
    plan = plan_layers(teacher.config, AttentionConfig())
    every = {i: list(range(n_kv)) for i, kind in plan.items() if kind != "softmax"}
    student = _converted(family, softmax_heads=every)
    assert converted_modules(student)
    randomise_new_parameters(student)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=2e-5, rtol=1e-4)


def _module_pair(window=4):
    """A plain lolcats module and one keeping kv head 0 (query heads 0, 1) exact, sharing the linear heads'
    parameters (those of query heads 2, 3)."""
    model = tiny_model("llama")
    original = model.model.layers[1].self_attn
    plain = HybridLinearAttention(original, model.config, 1, feature_dim=8, window=window)
    split = HybridLinearAttention(original, model.config, 1, feature_dim=8, window=window, softmax_kv_heads=[0])
    randomise_new_parameters(plain)
    with torch.no_grad():
        for name, p in split.named_new_parameters().items():
            p.copy_(plain.named_new_parameters()[name][2:])
    return model, plain, split


def _exact_heads(module, hidden, pe, cu_seqlens=None):
    """Reference: causal softmax per head from the materialised probabilities, `[B, T, H, D]`."""
    from linearize.attention.projection import project_qkv

    q, k, v = project_qkv(module, hidden, pe)
    T = q.shape[1]
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, dim=2)) * module.scaling
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if cu_seqlens is not None:
        seq = torch.zeros(T, dtype=torch.long)
        for start in cu_seqlens[1:-1]:
            seq[start:] += 1
        allowed &= seq[:, None] == seq[None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.repeat_interleave(2, dim=2))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_split_output_and_gradients_equal_the_two_parts_run_apart(packed):
    model, plain, split = _module_pair()
    B, T = (1, 19) if packed else (2, 19)
    hidden = torch.randn(B, T, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pe = model.model.rotary_emb(hidden, torch.arange(T)[None])
    cu = torch.tensor([0, 7, 19]) if packed else None
    out = split.attention_heads(hidden, pe, cu_seqlens=cu).view(B, T, 4, -1)
    want_linear = plain.attention_heads(hidden, pe, cu_seqlens=cu).view(B, T, 4, -1)
    torch.testing.assert_close(out[:, :, 2:], want_linear[:, :, 2:])
    torch.testing.assert_close(out[:, :, :2], _exact_heads(split, hidden, pe, cu)[:, :, :2], atol=1e-5, rtol=1e-4)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (want_linear[:, :, 2:] * weight[:, :, 2:]).sum().backward()
    for name, p in split.named_new_parameters().items():
        torch.testing.assert_close(p.grad, plain.named_new_parameters()[name].grad[2:], atol=1e-5, rtol=1e-4)


def test_split_attention_weights_are_the_parts_weights():
    model, plain, split = _module_pair()
    hidden = torch.randn(1, 9, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(9)[None])
    got, want = split.attention_weights(hidden, pe), plain.attention_weights(hidden, pe)
    torch.testing.assert_close(got[:, 2:], want[:, 2:])
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, 9), atol=1e-4, rtol=0)


def test_stage_one_parameters_exclude_the_softmax_heads():
    model = _converted(softmax_heads={"1": [1], "2": [0, 1]})
    modules = converted_modules(model)
    assert {n: tuple(p.shape) for n, p in modules[1].named_new_parameters().items()} == {
        "feature_map_q.weight": (2, 16, 8),
        "feature_map_k.weight": (2, 16, 8),
        "window_factors": (2,),
    }
    assert all(p.numel() == 0 for p in modules[2].new_parameters())
    assert modules[0].named_new_parameters()["window_factors"].shape == (4,)
    from linearize.train.registry import _new_attention_parameters

    # What the attention stage trains: query heads 4 + 2 + 0 + 4, each with two [16, 8] maps and a window weight.
    trained = _new_attention_parameters(model)
    assert sum(p.numel() for p in trained.values()) == (4 + 2 + 0 + 4) * (2 * 16 * 8 + 1)


@pytest.mark.parametrize("kind", ["lolcats", "hedgehog"])
def test_generate_with_the_cache_equals_the_full_forward_and_reports_its_size(kind):
    model = _converted(kind=kind, softmax_heads={"1": [1], "3": [0]}, softmax_layers=[2])
    randomise_new_parameters(model)
    prompt = _ids(batch=2, length=9)
    cache = LinearizeCache(model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=7, do_sample=False, cache=cache, pad_token_id=0)
        full = model(out).logits
    assert torch.equal(out[:, 9:], full[:, 8:-1].argmax(-1))
    # The cache holds 15 tokens (the last generated one was never fed back); fp32 model, 4 bytes per element.
    assert cache.nbytes() == cache_bytes_at(model.config, 15, batch=2, dtype_bytes=4)["total"]
    # One kept kv head of size 16 in layers 1 and 3: keys and values in fp32 plus a mask byte, per row.
    assert cache.layers[1].state.bytes_per_token() == 2 * (2 * 16 * 4 + 1)
    teacher_bytes = cache_bytes_at(tiny_model("llama").config, 15, batch=2, dtype_bytes=4)
    assert teacher_bytes["total"] == teacher_bytes["teacher"] == 4 * 2 * 2 * 16 * 15 * 2 * 4


def test_left_padded_decoding_matches_the_unpadded_row():
    model = _converted(softmax_heads={"0": [0], "1": [1]})
    randomise_new_parameters(model)
    prompt = _ids(batch=1, length=8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        alone = model.generate(prompt, **greedy)
        batch = model.generate(padded, attention_mask=mask, **greedy)
    assert torch.equal(batch.sequences[:, 11:], alone.sequences[:, 8:])
    torch.testing.assert_close(torch.stack(batch.logits), torch.stack(alone.logits), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "choice", [dict(softmax_head_budget=0.25), dict(softmax_heads={"1": [0, 1], "2": [1]})], ids=["budget", "listed"]
)
def test_export_reloads_strictly_with_the_same_logits_and_without_scoring(tmp_path, monkeypatch, choice):
    model = _converted(**choice)
    randomise_new_parameters(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)

    def no_scoring(*args, **kwargs):
        raise AssertionError("a reload must not score the model again")

    monkeypatch.setattr("linearize.models.choose.retrieval_scores", no_scoring)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    assert {i: m.split.softmax_kv for i, m in converted_modules(loaded).items()} == {
        i: m.split.softmax_kv for i, m in converted_modules(model).items()
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)


def test_head_split_groups_query_heads_with_their_kv_head():
    split = HeadSplit(num_heads=6, num_kv_heads=3, softmax_kv_heads=[2, 0])
    assert split.softmax_q == [0, 1, 4, 5] and split.linear_q == [2, 3] and split.linear_kv == [1]
    heads = torch.arange(6)
    order = torch.cat([heads[split.linear_q], heads[split.softmax_q]])
    assert torch.equal(order[split.restore], heads)


def test_the_retrieval_recipe_keeps_the_smollm2_cache_at_4k_under_a_fifth_of_the_teachers():
    """The arithmetic in lolcats-retrieval.yaml: 9 of 90 kv heads kept on SmolLM2-135M's shape."""
    import transformers

    from linearize.config import load_recipe, to_dict

    config = transformers.LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64
    )
    attention = load_recipe("lolcats-retrieval").attention
    kept = round(attention.softmax_head_budget * 30 * 3)
    assert kept == 9
    heads = {str(layer): [0] for layer in range(kept)}
    resolved = from_dict(AttentionConfig, to_dict(attention) | {"softmax_head_budget": 0.0, "softmax_heads": heads})
    config.linearize = {"attention": to_dict(resolved), "layers": {str(i): "lolcats" for i in range(30)}}
    at_4k = cache_bytes_at(config, 4096)
    assert at_4k["teacher"] == 30 * 3 * 128 * 4096 * 2
    assert 0.19 < at_4k["ratio"] <= 0.20
    assert cache_bytes_at(config, 32768)["ratio"] < 0.12
