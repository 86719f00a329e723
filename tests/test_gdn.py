"""The `gdn` kind (Gated DeltaNet) on tiny models: its math against the naive op, its start, and the bundled `gdn` /
`gdn-hybrid` recipes end to end (train, export, fresh-process reload, decode). Packing, padding, the families and
the start from a teacher checkpoint are checked with the other kinds, in `test_gated_kinds.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kind_checks import (
    converted,
    decode_equals_full,
    decoded,
    generates_greedily,
    layer_inputs,
    perturb,
    token_ids,
    write_corpus,
)
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig
from linearize.attention import converted_modules
from linearize.attention.gdn import GatedDeltaAttention
from linearize.attention.projection import project_qkv
from linearize.config import load_recipe
from linearize.errors import LinearizeError
from linearize.kernels.delta import delta_backend, gated_delta_naive
from linearize.kernels.gla.fla_path import fla_version
from linearize.train.pipeline import run_pipeline


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_the_module_is_the_naive_rule_with_its_norm_and_gate(rope):
    hidden, pe = layer_inputs(T=19)
    model = converted("gdn", options={"rope": rope})
    perturb(model)
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


def test_the_start_remembers_writes_halfway_and_leaves_the_gate_open():
    hidden, pe = layer_inputs()
    model = converted("gdn")
    m = converted_modules(model)[0]
    with torch.no_grad():
        g = -m.A_log.exp() * F.softplus(m.a_proj(hidden) + m.dt_bias)
        # Every token the same decay per head, from 1e-3 to 1e-1 across the heads; beta 1/2; gate 1.
        torch.testing.assert_close(g[0, 0], -torch.logspace(-3, -1, m.num_heads), rtol=1e-5, atol=0)
        assert torch.equal(g[0], g[0, :1].expand_as(g[0]))
        assert torch.equal(torch.sigmoid(m.b_proj(hidden)), torch.full_like(g, 0.5))
        torch.testing.assert_close(F.silu(m.g_proj(hidden)), torch.ones(2, 13, m.num_heads * m.head_dim), atol=1e-4,
                                   rtol=0)  # fmt: skip


def test_options_are_checked():
    with pytest.raises(LinearizeError, match="dt_min"):
        AttentionConfig(kind="gdn", options={"dt_min": 0.5, "dt_max": 0.1})
    with pytest.raises(LinearizeError, match="unknown recipe key 'attention.options.gate_rank'"):
        load_recipe("gdn", ["attention.options.gate_rank=4"])


def _reload_in_fresh_process(tmp_path, folders, ids):
    """Each exported folder (name -> (folder, logits of `ids` in this process)) loads in a fresh Python through its
    own modeling code (`trust_remote_code`) and gives the same logits."""
    torch.save(ids, tmp_path / "ids.pt")
    torch.save({name: (str(folder), logits) for name, (folder, logits) in folders.items()}, tmp_path / "want.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM as A\nd = sys.argv[1]\n"
        "ids = torch.load(f'{d}/ids.pt')\n"
        "for folder, want in torch.load(f'{d}/want.pt').values():\n"
        "    m = A.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "    assert type(m).__module__.startswith('transformers_modules.'), type(m).__module__\n"
        "    with torch.no_grad():\n"
        "        torch.testing.assert_close(m(ids, use_cache=False).logits, want)\n"
        "print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


def test_bundled_recipes_train_export_reload_fresh_and_decode_as_they_prefill(tmp_path, corpus):
    tiny_dir = save_tiny("llama", tmp_path / "tiny")
    sets = [
        *("data.seq_len=32", "transfer.tokens=512", "finetune.tokens=256", "run.checkpoint_every=100"),
        *("report.enabled=false", f"data.dataset={corpus}"),
    ]
    # The tiny model's 4 layers: a quarter kept as softmax, chosen by a short copy probe.
    hybrid = ["attention.softmax_budget=0.25", "attention.probe.block=16", "attention.probe.samples=2"]
    x = token_ids(seed=4)
    start = converted_modules(converted("gdn"))[0].named_new_parameters()
    folders = {}
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
        decode_equals_full(model, token_ids())
        generates_greedily(model, x)
        with torch.no_grad():
            folders[recipe] = (out, model(x, use_cache=False).logits)
    # The exported code in a fresh process, here for the hybrid's probe-chosen softmax layer too
    # (`test_export_bundle.py` reloads each kind alone).
    _reload_in_fresh_process(tmp_path, folders, x)


def _rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@pytest.mark.skipif(not torch.cuda.is_available() or fla_version() is None, reason="needs a CUDA GPU and fla-core")
@pytest.mark.parametrize("heads", [{}, {"1": [0]}], ids=["linear", "kept-head"])
def test_gpu_fla_model_matches_the_pytorch_path_decodes_as_it_prefills_and_trains(monkeypatch, heads):
    model = converted("gdn", options={"conv_kernel": 4}, softmax_heads=heads)
    perturb(model)
    model = model.to("cuda", torch.bfloat16).eval()
    for m in converted_modules(model).values():
        m.float_new_parameters()
    # 100 tokens: fla's chunk kernel for the prefill, its recurrent kernel for the steps after.
    ids = token_ids(2, 100).cuda()
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    assert delta_backend(torch.empty(1, device="cuda")) == "fla"
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        reference = model(ids, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
        steps, _ = decoded(model, ids, 80)
    assert _rel(full, reference) < 2e-2, "fla against the PyTorch path"
    assert _rel(steps, full) < 2e-2, "decoding against the full forward"
    # A training step: fla's backward, or the PyTorch path where fla refuses it (the dispatcher says which).
    model.train()
    model(ids, labels=ids).loss.backward()
    for m in converted_modules(model).values():
        for name, p in m.named_new_parameters().items():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
