"""The `rwkv7` kind and the `radlads` recipe on tiny models: the three stages, export and reload, decoding, its
start, and the kind's math against the GLA op where the two coincide. Packing, padding, the families, the declared
cache size and the start from a teacher checkpoint are checked with the other kinds in `test_gated_kinds.py`; the
export's reload in a fresh process without linearize, with every kind, in `test_export_bundle.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kind_checks import (
    RWKV7_RANKS,
    converted,
    decode_equals_full,
    decoded,
    generates_greedily,
    layer_inputs,
    perturb,
    token_ids,
    write_corpus,
)
from tiny_models import save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from linearize.attention import converted_modules
from linearize.attention.gated import GatedState
from linearize.attention.projection import project_qkv
from linearize.attention.rwkv7 import Rwkv7Attention
from linearize.config import load_recipe
from linearize.kernels.gla import gla_naive
from linearize.train.pipeline import run_pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny")


def test_the_radlads_recipe_has_its_three_stages():
    recipe = load_recipe("radlads")
    align, distil, long = recipe.stages
    assert recipe.attention.kind == "rwkv7"
    assert (align.objective, align.trains, align.xent_weight) == ("hidden_state", "attention", 0.0)
    assert align.optim.schedule == "cosine" and align.optim.lr == 1e-3 and align.optim.betas == [0.9, 0.95]
    assert (distil.objective, distil.trains) == ("kl", "all") and distil.optim.lr <= 1e-5
    assert (long.objective, long.trains, long.ce_weight, long.kd_weight) == ("mix", "all", 0.5, 0.5)
    assert long.seq_len > recipe.data.seq_len and long.optim.lr < distil.optim.lr


def test_radlads_trains_exports_reloads_and_decodes_as_it_prefills(tmp_path, tiny_dir, corpus):
    sets = [
        *("data.seq_len=32", "transfer.tokens=512", "finetune.tokens=256", "long.tokens=128", "long.seq_len=64"),
        *("run.checkpoint_every=100", "report.enabled=false", f"data.dataset={corpus}"),
        *(f"attention.options.{k}={v}" for k, v in RWKV7_RANKS.items()),
    ]
    out = tmp_path / "out"
    summary = run_pipeline(str(tiny_dir), load_recipe("radlads", sets), out).summary
    assert [s["name"] for s in summary["stages"]] == ["transfer", "finetune", "long"]
    assert summary["stages"][2]["tokens"] == summary["stages"][2]["steps"] * 64
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    modules = converted_modules(model)
    assert sorted(modules) == [0, 1, 2, 3] and all(isinstance(m, Rwkv7Attention) for m in modules.values())
    # Stage 1 moved the new parameters off their start; stages 2 and 3 trained the MLPs too (every weight).
    start = converted_modules(converted("rwkv7"))[0]
    for name in ("decay.up.weight", "iclr.up.weight", "gate.up.weight", "k_k", "k_a", "norm_weight", "norm_bias"):
        assert not torch.equal(modules[0].get_parameter(name), start.get_parameter(name)), name
    teacher = tiny_model("llama")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[key], teacher.state_dict()[key])

    cache = decode_equals_full(model, token_ids())
    assert isinstance(cache.recurrent_layer(0).state, GatedState)
    generates_greedily(model, token_ids(seed=2))


def test_the_start_has_slow_and_fast_decays_and_a_shrunk_norm():
    got = converted_modules(converted("rwkv7"))[2].named_new_parameters()
    # The start the module docstring promises: slow decays in the first channels, fast in the last; the norm's
    # weight below 1 in a layer short of the last.
    w0 = got["decay.up.bias"].detach()
    assert w0[0].item() == pytest.approx(-6.5) and w0[-1].item() == pytest.approx(-1.5) and (w0.diff() >= 0).all()
    assert torch.allclose(got["norm_weight"].detach(), torch.tensor(0.75**0.7))


def test_with_its_learning_rate_at_zero_the_kind_is_gated_linear_attention():
    # icl = 0 and k_a = 0: b = 0 drops the low-rank part and k stays the teacher's, so the recurrence is GLA over the
    # teacher's rotated q/k and v with the kind's decays, followed by the per-head norm and the gate.
    hidden, pe = layer_inputs()
    model = converted("rwkv7")
    perturb(model)
    m = converted_modules(model)[1]
    with torch.no_grad():
        m.iclr.up.weight.zero_()
        m.iclr.up.bias.fill_(-60.0)
        m.k_a.zero_()
        got = m.attention_heads(hidden, pe)
        q, k, v = project_qkv(m, hidden, pe)
        w = -torch.exp(torch.tensor(-0.5)) * torch.sigmoid(m.decay(hidden).unflatten(-1, (m.num_heads, -1)))
        o, _ = gla_naive(q, k, v, w, scale=m.scaling)
        o = F.group_norm(
            o.flatten(0, 1).flatten(1).float(), m.num_heads, m.norm_weight, m.norm_bias, eps=1e-5 * m.head_dim
        )
        want = o.view(*hidden.shape[:2], -1) * m.gate(hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # A learning rate above zero removes part of what each key stored: the output moves.
    with torch.no_grad():
        m.iclr.up.bias.fill_(2.0)
        assert (m.attention_heads(hidden, pe) - got).abs().max() > 1e-3


def test_a_hybrid_with_a_softmax_layer_decodes_as_it_prefills():
    model = converted("rwkv7", "qwen3", softmax_layers=[2])
    assert sorted(converted_modules(model)) == [0, 1, 3]
    perturb(model)
    decode_equals_full(model, token_ids(2, 9))


def test_bad_options_are_refused_in_one_line():
    from linearize.errors import LinearizeError

    with pytest.raises(LinearizeError, match="rwkv7 ranks must be >= 0"):
        load_recipe("radlads", ["attention.options.decay_rank=-1"]).attention.kind_options()
    with pytest.raises(LinearizeError, match="attention.options.colour"):
        load_recipe("radlads", ["attention.options.colour=red"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fla_path_matches_the_torch_path_and_decodes_as_it_prefills(monkeypatch):
    from linearize.kernels.gla.fla_path import fla_version

    if fla_version() is None:
        pytest.skip("needs fla-core")
    model = converted("rwkv7")
    perturb(model)
    model = model.cuda().to(torch.bfloat16)
    ids = token_ids(2, 80).cuda()
    with torch.no_grad():
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        want = model(ids, use_cache=False).logits.float()
        monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
        got = model(ids, use_cache=False).logits.float()
        # Prefill past fla's 64-token switch (chunk kernel), then decode steps on its fused recurrent kernel.
        steps = decoded(model, ids, 70)[0].float()
    scale = want.pow(2).mean().sqrt()
    assert (got - want).pow(2).mean().sqrt() < 2e-2 * scale
    assert (steps - got).pow(2).mean().sqrt() < 2e-2 * scale
