"""The gated kinds (gla, liger, lizard, lawcat) on tiny models: convert, train, export, reload, decode; and the checks
every recurrent-state kind (these, `gdn` and `rwkv7`) passes alike: a teacher checkpoint gets the kind's start,
decoding equals the full forward on every family, packed sequences equal separate forwards, left padding leaks
nothing. Exports reload in a fresh process without linearize in `test_export_bundle.py`, with every kind.

Also checks each kind's math against an independent path: with its gate held at 1, `gla` is the `hedgehog` kind
and `lizard` is its two branches' naive ops under one normaliser.
"""

from __future__ import annotations

import pytest
import torch
from kind_checks import (
    CONFIGS,
    attention_config,
    converted,
    decode_equals_full,
    generates_greedily,
    heads,
    layer_inputs,
    perturb,
    token_ids,
    write_corpus,
)
from tiny_models import save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize.attention import converted_modules, get_attention_kind
from linearize.attention.gated import GatedAttention, GatedState
from linearize.attention.projection import project_qkv
from linearize.config import load_recipe
from linearize.eval.controls import attention_variant
from linearize.kernels.gla import gla_naive
from linearize.kernels.gla.naive import EPS
from linearize.kernels.window import window_naive
from linearize.train.pipeline import run_pipeline

KINDS = ["gla", "liger", "lizard", "lawcat"]
FAMILIES = ["qwen3", "gemma2", "gemma3_text", "phi3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.parametrize("kind", KINDS)
def test_bundled_recipe_trains_exports_reloads_and_decodes_as_it_prefills(kind, tmp_path, tiny_dir, corpus):
    sets = [
        *("data.seq_len=32", "attention.feature_dim=8", "attention.window=4", "transfer.tokens=512"),
        *("finetune.tokens=256", "run.checkpoint_every=100", "report.enabled=false", f"data.dataset={corpus}"),
    ]
    recipe = load_recipe(kind, sets)
    run_pipeline(str(tiny_dir), recipe, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    modules = converted_modules(model)
    assert sorted(modules) == [0, 1, 2, 3] and all(isinstance(m, GatedAttention) for m in modules.values())
    start = converted(kind)
    if kind == "liger":
        # No new parameters: the LoRA stage, merged, moved the teacher's projections.
        assert not modules[0].new_parameters()
        assert not torch.equal(modules[0].q_proj.weight, converted_modules(start)[0].q_proj.weight)
    else:
        # Stage 1 moved the kind's new parameters off their start.
        for name, p in converted_modules(start)[0].named_new_parameters().items():
            assert not torch.equal(modules[0].get_parameter(name), p), name
    cache = decode_equals_full(model, token_ids())
    state = cache.recurrent_layer(0).state
    assert isinstance(state, GatedState) and (state.window is not None) == (kind in ("liger", "lizard"))
    assert (state.conv is not None) == (kind == "lawcat")
    generates_greedily(model, token_ids(seed=2))


@pytest.mark.parametrize("name", ["gla", "lawcat", "lizard", "gdn", "rwkv7"])
def test_a_teacher_checkpoint_gets_the_kinds_start(name, tmp_path):
    model = converted(name)
    fresh = {
        (i, n): p.detach().clone()
        for i, m in converted_modules(model).items()
        for n, p in m.named_new_parameters().items()
    }
    tiny_model("llama").save_pretrained(tmp_path / "teacher")
    skeleton = type(model).from_pretrained(tmp_path / "teacher", config=model.config)
    got = {(i, n): p for i, m in converted_modules(skeleton).items() for n, p in m.named_new_parameters().items()}
    assert got.keys() == fresh.keys()
    for (i, n), p in got.items():
        if n.endswith("down.weight"):
            # Random by design (the up projections start at zero): only the scale is the start.
            assert abs(p.std().item() - fresh[i, n].std().item()) < 0.5 * fresh[i, n].std().item()
        else:
            assert torch.equal(p, fresh[i, n]), (i, n)


# gdn's conv and rope on the families with norms and partial rotary, its plain form on those with a softcap.
FAMILY_CASES = [
    *((name, family) for name in [*KINDS, "rwkv7"] for family in FAMILIES),
    *(("gdn-conv-rope", "qwen3"), ("gdn", "gemma2"), ("gdn", "gemma3_text"), ("gdn-conv-rope", "phi3")),
]


@pytest.mark.parametrize("name,family", FAMILY_CASES)
def test_families_decode_as_they_prefill_and_the_cache_is_what_the_kind_declares(name, family):
    model = converted(name, family)
    perturb(model)
    cache = decode_equals_full(model, token_ids(1, 9))
    declared = get_attention_kind(CONFIGS[name]["kind"]).state_bytes
    if declared is not None:
        idx = min(converted_modules(model))
        cfg = attention_config(name)
        # What the cache holds after 9 tokens, and no more after 10,000.
        assert cache.recurrent_layer(idx).nbytes() == declared(model.config, cfg, idx, 9, 1, 4)
        assert declared(model.config, cfg, idx, 10_000, 1, 4) == declared(model.config, cfg, idx, 9, 1, 4)


def test_gla_with_its_gate_at_one_is_hedgehog():
    hidden, pe = layer_inputs()
    gla = converted("gla")
    hedgehog = convert(tiny_model("llama"), AttentionConfig(kind="hedgehog", window=4, feature_dim=8))
    a, b = converted_modules(gla)[0], converted_modules(hedgehog)[0]
    with torch.no_grad():
        for fa, fb in ((a.feature_map_q, b.feature_map_q), (a.feature_map_k, b.feature_map_k)):
            fa.weight.normal_(generator=torch.Generator().manual_seed(4))
            fb.weight.copy_(fa.weight)
        a.gate.up.bias.fill_(40.0)
    torch.testing.assert_close(heads(a, hidden, pe), heads(b, hidden, pe), rtol=1e-4, atol=1e-5)
    # A real gate forgets: the output moves.
    with torch.no_grad():
        a.gate.up.bias.fill_(-1.0)
    assert (heads(a, hidden, pe) - heads(b, hidden, pe)).abs().max() > 1e-3


def test_lizard_is_its_two_naive_branches_under_one_normaliser():
    hidden, pe = layer_inputs(T=19)
    lizard = converted("lizard", options={"sinks": 2})
    perturb(lizard)
    m = converted_modules(lizard)[0]
    params = m.new_parameters()
    q, k, v = project_qkv(m, hidden, pe)
    cos, sin = pe
    q0, k0, _ = project_qkv(m, hidden, (torch.ones_like(cos), torch.zeros_like(sin)))
    fq, fk = m._features(q0, k0)
    g = m.gate(hidden, k0).expand(*fq.shape[:-1], fq.shape[-1])
    lin, _ = gla_naive(fq, fk, torch.cat([v, torch.ones_like(v[..., :1])], -1).float(), g, scale=1.0)
    num_w, den_w = window_naive(q, k, v, m.window, m.scaling, m.sinks)
    want = ((num_w + lin[..., :-1]) / (den_w + lin[..., -1] + EPS)[..., None]).reshape(2, 19, -1)
    got = m.attention_heads(hidden, pe)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Every new parameter's gradient (feature maps, gate, sinks) as well.
    d_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(8))
    for a, b, p in zip(
        torch.autograd.grad((got * d_out).sum(), params),
        torch.autograd.grad((want * d_out).sum(), params),
        params,
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda text, p=p: f"{p.shape}: {text}")
    # Sinks add to the normaliser only: raising them shrinks every output, never turns its direction.
    with torch.no_grad():
        base = heads(m, hidden, pe)
        m.sinks.add_(3.0)
        sunk = heads(m, hidden, pe)
    assert (sunk.norm(dim=-1) < base.norm(dim=-1)).all()


@pytest.mark.parametrize(
    "name",
    ["lawcat", "lizard", "rwkv7", "gdn", "gdn-conv-rope", "gdn-no-gate", "gdn-heads", "lizard-heads", "lawcat-heads"],
)
def test_packed_sequences_equal_separate_forwards(name):
    hidden, _ = layer_inputs(T=12, B=1)
    model = converted(name)
    perturb(model)
    m = converted_modules(model)[0]
    rotary = tiny_model("llama").model.rotary_emb
    # Each packed sequence restarts its positions.
    packed_pe = rotary(hidden, torch.cat([torch.arange(5), torch.arange(7)])[None])
    packed = heads(m, hidden, packed_pe, cu_seqlens=torch.tensor([0, 5, 12]))
    for a, b in ((0, 5), (5, 12)):
        alone = heads(m, hidden[:, a:b], rotary(hidden, torch.arange(b - a)[None]))
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["liger", "lizard"])
def test_controls_switch_each_branch_off(kind):
    model = converted(kind)
    ids = token_ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        outs = {}
        for control in ("window-only", "linear-only"):
            with attention_variant(model, control):
                outs[control] = model(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, full)
    assert all((o - full).abs().max() > 1e-4 for o in outs.values())
    assert (outs["window-only"] - outs["linear-only"]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "name", ["lizard", "lawcat", "rwkv7", "gdn-conv-rope", "gdn-heads", "lizard-heads", "liger-heads"]
)
def test_left_padding_gives_the_unpadded_outputs(name):
    model = converted(name)
    perturb(model)
    x = token_ids(1, 9)
    # Padding with a real token's id: its embedding is not zero, so a leak would show.
    padded = torch.cat([torch.full((1, 3), 7, dtype=x.dtype), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], 1)
    with torch.no_grad():
        alone = model(x, use_cache=False).logits
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        got = model(padded, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got[:, 3:], alone, rtol=1e-4, atol=1e-5)
