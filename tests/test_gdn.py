"""The `gdn` kind (Gated DeltaNet) on tiny models: its math against the naive op, its start, packing, padding,
every family, and the bundled `gdn` / `gdn-hybrid` recipes end to end (train, export, fresh-process reload, decode).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, WORDS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize._compat import CACHE_KWARG, output_cache
from linearize.attention import converted_modules
from linearize.attention.gdn import DeltaState, GatedDeltaAttention, gdn_state_bytes
from linearize.attention.projection import project_qkv
from linearize.config import load_recipe
from linearize.errors import LinearizeError
from linearize.kernels.delta import delta_backend, gated_delta_naive
from linearize.kernels.gla.fla_path import fla_version
from linearize.train.pipeline import run_pipeline

VARIANTS = {
    "default": {},
    "conv-rope": {"conv_kernel": 4, "rope": True},
    "no-gate": {"output_gate": False},
}


def _ids(B=2, T=11, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _gdn(family="llama", **options):
    return convert(tiny_model(family), AttentionConfig(kind="gdn", chunk_size=4, options=options))


def _perturb(model, seed=9):
    """Move every new parameter off its start (zero projections and an identity conv hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in converted_modules(model).values():
            for p in m.new_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


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


def _layer_inputs(T=13, B=2):
    teacher = tiny_model("llama")
    hidden = torch.randn(B, T, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pe = teacher.model.rotary_emb(hidden, torch.arange(T)[None].expand(B, T))
    return hidden, pe


def _heads(module, hidden, pe, **kw):
    with torch.no_grad():
        return module.attention_heads(hidden, pe, **kw)


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_the_module_is_the_naive_rule_with_its_norm_and_gate(rope):
    hidden, pe = _layer_inputs(T=19)
    model = _gdn(rope=rope)
    _perturb(model)
    m = converted_modules(model)[0]
    params = m.new_parameters()
    cos, sin = pe
    q, k, v = project_qkv(m, hidden, pe if rope else (torch.ones_like(cos), torch.zeros_like(sin)))
    g = -m.A_log.exp() * F.softplus(hidden @ m.a_proj.weight.T + m.dt_bias)
    beta = torch.sigmoid(hidden @ m.b_proj.weight.T + m.b_proj.bias)
    o, _ = gated_delta_naive(q, k, v, g, beta, qk_l2norm=True)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight
    want = (o * F.silu(hidden @ m.g_proj.weight.T + m.g_proj.bias).view_as(o)).flatten(2)
    got = m.attention_heads(hidden, pe)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    d_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(8))
    got_grads = torch.autograd.grad((got * d_out).sum(), params)
    want_grads = torch.autograd.grad((want * d_out).sum(), params)
    for a, b, name in zip(got_grads, want_grads, m.named_new_parameters(), strict=True):
        # fp32 rounding of the chunked path against the step-by-step one, relative to the gradient's size.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(),
                                   msg=lambda text, name=name: f"{name}: {text}")  # fmt: skip


def test_the_start_remembers_writes_halfway_and_leaves_the_gate_open(tmp_path):
    hidden, pe = _layer_inputs()
    model = _gdn()
    m = converted_modules(model)[0]
    with torch.no_grad():
        g = -m.A_log.exp() * F.softplus(m.a_proj(hidden) + m.dt_bias)
        # Every token the same decay per head, from 1e-3 to 1e-1 across the heads; beta 1/2; gate 1.
        torch.testing.assert_close(g[0, 0], -torch.logspace(-3, -1, m.num_heads), rtol=1e-5, atol=0)
        assert torch.equal(g[0], g[0, :1].expand_as(g[0]))
        assert torch.equal(torch.sigmoid(m.b_proj(hidden)), torch.full_like(g, 0.5))
        torch.testing.assert_close(F.silu(m.g_proj(hidden)), torch.ones(2, 13, m.num_heads * m.head_dim), atol=1e-4,
                                   rtol=0)  # fmt: skip
    # A teacher checkpoint gets the same start (nothing in it is random).
    fresh = {n: p.detach().clone() for n, p in m.named_new_parameters().items()}
    tiny_model("llama").save_pretrained(tmp_path / "teacher")
    skeleton = type(model).from_pretrained(tmp_path / "teacher", config=model.config)
    for name, p in converted_modules(skeleton)[0].named_new_parameters().items():
        assert torch.equal(p, fresh[name]), name


def test_options_are_checked():
    with pytest.raises(LinearizeError, match="dt_min"):
        AttentionConfig(kind="gdn", options={"dt_min": 0.5, "dt_max": 0.1})
    with pytest.raises(LinearizeError, match="unknown recipe key 'attention.options.gate_rank'"):
        load_recipe("gdn", ["attention.options.gate_rank=4"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_sequences_equal_separate_forwards(variant):
    hidden, _ = _layer_inputs(T=12, B=1)
    model = _gdn(**VARIANTS[variant])
    _perturb(model)
    m = converted_modules(model)[0]
    rotary = tiny_model("llama").model.rotary_emb
    packed_pe = rotary(hidden, torch.cat([torch.arange(5), torch.arange(7)])[None])
    packed = _heads(m, hidden, packed_pe, cu_seqlens=torch.tensor([0, 5, 12]))
    for a, b in ((0, 5), (5, 12)):
        alone = _heads(m, hidden[:, a:b], rotary(hidden, torch.arange(b - a)[None]))
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-6)


def test_left_padding_gives_the_unpadded_outputs():
    model = _gdn(conv_kernel=4, rope=True)
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


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_families_decode_as_they_prefill_and_the_cache_is_what_the_kind_declares(family):
    variant = VARIANTS["conv-rope"] if family in ("qwen3", "phi3") else VARIANTS["default"]
    model = _gdn(family, **variant)
    _perturb(model)
    cache = _decode_equals_full(model, _ids(1, 9))
    idx, module = next(iter(converted_modules(model).items()))
    state = cache.recurrent_layer(idx).state
    assert isinstance(state, DeltaState) and (state.conv is not None) == bool(variant.get("conv_kernel"))
    cfg = AttentionConfig(kind="gdn", options=variant)
    assert cache.recurrent_layer(idx).nbytes() == gdn_state_bytes(model.config, cfg, idx, 9, 1, 4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(60)))
    return path


def test_bundled_recipes_train_export_reload_fresh_and_decode_as_they_prefill(tmp_path, corpus):
    tiny_dir = save_tiny("llama", tmp_path / "tiny")
    sets = [
        *("data.seq_len=32", "transfer.tokens=512", "finetune.tokens=256", "run.checkpoint_every=100"),
        *("report.enabled=false", f"data.dataset={corpus}"),
    ]
    # The tiny model's 4 layers: a quarter kept as softmax, chosen by a short copy probe.
    hybrid = ["attention.softmax_budget=0.25", "attention.probe.block=16", "attention.probe.samples=2"]
    ids = _ids(seed=4)
    start = converted_modules(_gdn())[0].named_new_parameters()
    for recipe in ("gdn", "gdn-hybrid"):
        out = tmp_path / recipe
        run_pipeline(str(tiny_dir), load_recipe(recipe, sets + (hybrid if recipe == "gdn-hybrid" else [])), out)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        modules = converted_modules(model)
        assert all(isinstance(m, GatedDeltaAttention) for m in modules.values())
        settings = json.loads((out / "config.json").read_text())["linearize"]
        layers = settings["layers"]
        # The hybrid's softmax layer is the probe's choice, recorded for reloads.
        assert ("selection" in settings) == (recipe == "gdn-hybrid")
        assert sorted(layers.values()) == (["gdn"] * 4 if recipe == "gdn" else ["gdn"] * 3 + ["softmax"])
        assert sorted(modules) == sorted(int(i) for i, kind in layers.items() if kind == "gdn")
        # The stages moved every new parameter off its start.
        first = modules[min(modules)]
        for name, p in start.items():
            assert not torch.equal(first.get_parameter(name), p), name
        _decode_equals_full(model, _ids())
        with torch.no_grad():
            generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
            # Greedy decoding with the cache picks what the full forward over the generated text predicts.
            logits = model(generated, use_cache=False).logits
            assert torch.equal(generated[0, 4:], logits[0, 3:-1].argmax(-1))
            torch.save(model(ids, use_cache=False).logits, tmp_path / f"{recipe}.pt")
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM as A\nd = sys.argv[1]\n"
        "ids = torch.load(f'{d}/ids.pt')\n"
        "for r in ('gdn', 'gdn-hybrid'):\n"
        "    m = A.from_pretrained(f'{d}/{r}', trust_remote_code=True).eval()\n"
        "    assert type(m).__module__.startswith('transformers_modules.'), type(m).__module__\n"
        "    with torch.no_grad():\n"
        "        torch.testing.assert_close(m(ids, use_cache=False).logits, torch.load(f'{d}/{r}.pt'))\n"
        "print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def _rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@pytest.mark.skipif(not torch.cuda.is_available() or fla_version() is None, reason="needs a CUDA GPU and fla-core")
def test_gpu_fla_model_matches_the_pytorch_path_decodes_as_it_prefills_and_trains(monkeypatch):
    model = _gdn(conv_kernel=4)
    _perturb(model)
    model = model.to("cuda", torch.bfloat16).eval()
    for m in converted_modules(model).values():
        m.float_new_parameters()
    # 100 tokens: fla's chunk kernel for the prefill, its recurrent kernel for the steps after.
    ids = _ids(2, 100).cuda()
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    assert delta_backend(torch.empty(1, device="cuda")) == "fla"
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        reference = model(ids, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
        out = model(ids[:, :80], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(80, 100):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            steps.append(out.logits)
    assert _rel(full, reference) < 2e-2, "fla against the PyTorch path"
    assert _rel(torch.cat(steps, 1), full) < 2e-2, "decoding against the full forward"
    # A training step: fla's backward, or the PyTorch path where fla refuses it (the dispatcher says which).
    model.train()
    model(ids, labels=ids).loss.backward()
    for m in converted_modules(model).values():
        for name, p in m.named_new_parameters().items():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
