"""The gated kinds (gla, liger, lizard, lawcat) on tiny models: convert, train, export, reload, decode.

Also checks each kind's math against an independent path: with its gate held at 1, `gla` is the `hedgehog` kind
and `lizard` is its two branches' naive ops under one normaliser.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, WORDS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize._compat import CACHE_KWARG, output_cache
from linearize.attention import converted_modules
from linearize.attention.gated import GatedAttention, GatedState
from linearize.attention.projection import project_qkv
from linearize.config import load_recipe
from linearize.eval.controls import attention_variant
from linearize.kernels.gla import gla_naive
from linearize.kernels.gla.naive import EPS
from linearize.kernels.window import window_naive
from linearize.train.pipeline import run_pipeline

KINDS = ["gla", "liger", "lizard", "lawcat"]
SMALL = dict(window=4, feature_dim=8)


def _ids(B=2, T=11, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _decode_equals_full(model, ids, prefix=5):
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefix], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    return cache


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(60)))
    return path


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
    start = convert(tiny_model("llama"), AttentionConfig(kind=kind, window=4, feature_dim=8))
    if kind == "liger":
        # No new parameters: the LoRA stage, merged, moved the teacher's projections.
        assert not modules[0].new_parameters()
        assert not torch.equal(modules[0].q_proj.weight, converted_modules(start)[0].q_proj.weight)
    else:
        # Stage 1 moved the kind's new parameters off their start.
        for name, p in converted_modules(start)[0].named_new_parameters().items():
            assert not torch.equal(modules[0].get_parameter(name), p), name
    cache = _decode_equals_full(model, _ids())
    state = cache.recurrent_layer(0).state
    assert isinstance(state, GatedState) and (state.window is not None) == (kind in ("liger", "lizard"))
    assert (state.conv is not None) == (kind == "lawcat")
    ids = _ids(seed=2)
    with torch.no_grad():
        generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        # Greedy decoding with the cache picks what the full forward over the generated text predicts.
        logits = model(generated, use_cache=False).logits
    assert torch.equal(generated[0, 4:], logits[0, 3:-1].argmax(-1))


@pytest.mark.parametrize("kind", ["gla", "lawcat", "lizard"])
def test_a_teacher_checkpoint_gets_the_kinds_start(kind, tmp_path):
    model = convert(tiny_model("llama"), AttentionConfig(kind=kind, **SMALL))
    fresh = {n: p.detach().clone() for n, p in converted_modules(model)[0].named_new_parameters().items()}
    tiny_model("llama").save_pretrained(tmp_path / "teacher")
    skeleton = type(model).from_pretrained(tmp_path / "teacher", config=model.config)
    for name, p in converted_modules(skeleton)[0].named_new_parameters().items():
        if name == "gate.down.weight":
            # Random by design (the up projection starts at zero): only its scale is the start.
            assert abs(p.std().item() - fresh[name].std().item()) < 0.5 * fresh[name].std().item()
        else:
            assert torch.equal(p, fresh[name]), name


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("kind", KINDS)
def test_families_with_norms_softcap_and_partial_rotary(kind, family):
    model = convert(tiny_model(family), AttentionConfig(kind=kind, **SMALL))
    _perturb(model)
    _decode_equals_full(model, _ids(1, 9))


def _perturb(model, seed=9):
    """Move every new parameter off its start (an identity conv, for one, hides a conv that never resets)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in converted_modules(model).values():
            for p in m.new_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _heads(module, hidden, pe, **kw):
    with torch.no_grad():
        return module.attention_heads(hidden, pe, **kw)


def _layer_inputs(family="llama", T=13):
    teacher = tiny_model(family)
    hidden = torch.randn(2, T, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pe = teacher.model.rotary_emb(hidden, torch.arange(T)[None].expand(2, T))
    return teacher, hidden, pe


def test_gla_with_its_gate_at_one_is_hedgehog():
    teacher, hidden, pe = _layer_inputs()
    gla = convert(tiny_model("llama"), AttentionConfig(kind="gla", **SMALL))
    hedgehog = convert(tiny_model("llama"), AttentionConfig(kind="hedgehog", **SMALL))
    a, b = converted_modules(gla)[0], converted_modules(hedgehog)[0]
    with torch.no_grad():
        for fa, fb in ((a.feature_map_q, b.feature_map_q), (a.feature_map_k, b.feature_map_k)):
            fa.weight.normal_(generator=torch.Generator().manual_seed(4))
            fb.weight.copy_(fa.weight)
        a.gate.up.bias.fill_(40.0)
    torch.testing.assert_close(_heads(a, hidden, pe), _heads(b, hidden, pe), rtol=1e-4, atol=1e-5)
    # A real gate forgets: the output moves.
    with torch.no_grad():
        a.gate.up.bias.fill_(-1.0)
    assert (_heads(a, hidden, pe) - _heads(b, hidden, pe)).abs().max() > 1e-3


def test_lizard_is_its_two_naive_branches_under_one_normaliser():
    teacher, hidden, pe = _layer_inputs(T=19)
    lizard = convert(tiny_model("llama"), AttentionConfig(kind="lizard", options={"sinks": 2}, **SMALL))
    _perturb(lizard)
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
        base = _heads(m, hidden, pe)
        m.sinks.add_(3.0)
        sunk = _heads(m, hidden, pe)
    assert (sunk.norm(dim=-1) < base.norm(dim=-1)).all()


@pytest.mark.parametrize("kind", ["lawcat", "lizard"])
def test_packed_sequences_equal_separate_forwards(kind):
    _, hidden, _ = _layer_inputs(T=12)
    model = convert(tiny_model("llama"), AttentionConfig(kind=kind, **SMALL))
    _perturb(model)
    m = converted_modules(model)[0]
    one = hidden[:1]
    cu = torch.tensor([0, 5, 12])
    # Each packed sequence restarts its positions.
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed_pe = tiny_model("llama").model.rotary_emb(one, pos)
    packed = _heads(m, one, packed_pe, cu_seqlens=cu)
    for a, b in ((0, 5), (5, 12)):
        alone_pe = tiny_model("llama").model.rotary_emb(one, torch.arange(b - a)[None])
        torch.testing.assert_close(packed[:, a:b], _heads(m, one[:, a:b], alone_pe), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["liger", "lizard"])
def test_controls_switch_each_branch_off(kind):
    model = convert(tiny_model("llama"), AttentionConfig(kind=kind, **SMALL))
    ids = _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        outs = {}
        for control in ("window-only", "linear-only"):
            with attention_variant(model, control):
                outs[control] = model(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, full)
    assert all((o - full).abs().max() > 1e-4 for o in outs.values())
    assert (outs["window-only"] - outs["linear-only"]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["lizard", "lawcat"])
def test_left_padding_gives_the_unpadded_outputs(kind):
    model = convert(tiny_model("llama"), AttentionConfig(kind=kind, **SMALL))
    _perturb(model)
    ids = _ids(1, 9)
    # Padding with a real token's id: its embedding is not zero, so a leak would show.
    padded = torch.cat([torch.full((1, 3), 7, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        alone = model(ids, use_cache=False).logits
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        got = model(padded, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got[:, 3:], alone, rtol=1e-4, atol=1e-5)


def test_exports_reload_in_a_fresh_process(tmp_path):
    ids = _ids(seed=4)
    for kind in KINDS:
        model = convert(tiny_model("llama"), AttentionConfig(kind=kind, **SMALL))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            torch.save(model(ids, use_cache=False).logits, tmp_path / f"{kind}.pt")
        model.save_pretrained(tmp_path / kind)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM as A\nd = sys.argv[1]\n"
        "ids = torch.load(f'{d}/ids.pt')\n"
        f"kinds = {KINDS!r}\n"
        "for k in kinds:\n"
        "    m = A.from_pretrained(f'{d}/{k}', trust_remote_code=True).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.testing.assert_close(m(ids, use_cache=False).logits, torch.load(f'{d}/{k}.pt'))\n"
        "print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
