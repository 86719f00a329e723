"""The `rwkv7` kind and the `radlads` recipe on tiny models: the three stages, export, reload in a fresh process,
decoding, packing, padding, other families, and the kind's math against the GLA op where the two coincide."""

from __future__ import annotations

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
from linearize.attention.gated import GatedState
from linearize.attention.projection import project_qkv
from linearize.attention.rwkv7 import Rwkv7Attention
from linearize.config import load_recipe
from linearize.kernels.gla import gla_naive
from linearize.train.pipeline import run_pipeline

# Low ranks keep the tiny model tiny (RADLADS's rule gives at least 32).
RANKS = {"decay_rank": 4, "iclr_rank": 4, "gate_rank": 4}
CONFIG = dict(kind="rwkv7", options=RANKS, chunk_size=4)


def _ids(B=2, T=11, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=9):
    """Move every new parameter off its start, so that a term that is zero or one at the start still shows."""
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(60)))
    return path


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


def test_radlads_trains_exports_reloads_in_a_fresh_process_and_decodes_as_it_prefills(tmp_path, tiny_dir, corpus):
    sets = [
        *("data.seq_len=32", "transfer.tokens=512", "finetune.tokens=256", "long.tokens=128", "long.seq_len=64"),
        *("run.checkpoint_every=100", "report.enabled=false", f"data.dataset={corpus}"),
        *(f"attention.options.{k}={v}" for k, v in RANKS.items()),
    ]
    out = tmp_path / "out"
    summary = run_pipeline(str(tiny_dir), load_recipe("radlads", sets), out).summary
    assert [s["name"] for s in summary["stages"]] == ["transfer", "finetune", "long"]
    assert summary["stages"][2]["tokens"] == summary["stages"][2]["steps"] * 64
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    modules = converted_modules(model)
    assert sorted(modules) == [0, 1, 2, 3] and all(isinstance(m, Rwkv7Attention) for m in modules.values())
    # Stage 1 moved the new parameters off their start; stages 2 and 3 trained the MLPs too (every weight).
    start = converted_modules(convert(tiny_model("llama"), AttentionConfig(**CONFIG)))[0]
    for name in ("decay.up.weight", "iclr.up.weight", "gate.up.weight", "k_k", "k_a", "norm_weight", "norm_bias"):
        assert not torch.equal(modules[0].get_parameter(name), start.get_parameter(name)), name
    teacher = tiny_model("llama")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[key], teacher.state_dict()[key])

    cache = _decode_equals_full(model, _ids())
    assert isinstance(cache.recurrent_layer(0).state, GatedState)
    ids = _ids(seed=2)
    with torch.no_grad():
        generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        # Greedy decoding with the cache picks what the full forward over the generated text predicts.
        logits = model(generated, use_cache=False).logits
        torch.save(model(ids, use_cache=False).logits, tmp_path / "logits.pt")
    assert torch.equal(generated[0, 4:], logits[0, 3:-1].argmax(-1))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM as A\nd = sys.argv[1]\n"
        "m = A.from_pretrained(f'{d}/out', trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    got = m(torch.load(f'{d}/ids.pt'), use_cache=False).logits\n"
        "torch.testing.assert_close(got, torch.load(f'{d}/logits.pt'))\nprint('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_a_teacher_checkpoint_gets_the_kinds_start(tmp_path):
    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG))
    fresh = {n: p.detach().clone() for n, p in converted_modules(model)[2].named_new_parameters().items()}
    tiny_model("llama").save_pretrained(tmp_path / "teacher")
    skeleton = type(model).from_pretrained(tmp_path / "teacher", config=model.config)
    got = converted_modules(skeleton)[2].named_new_parameters()
    assert got.keys() == fresh.keys()
    for name, p in got.items():
        if name.endswith("down.weight"):
            # Random by design (the up projections start at zero): only the scale is the start.
            assert abs(p.std().item() - fresh[name].std().item()) < 0.5 * fresh[name].std().item()
        else:
            assert torch.equal(p, fresh[name]), name
    # The start the module docstring promises: slow decays in the first channels, fast in the last; the norm's
    # weight below 1 in a layer short of the last.
    w0 = got["decay.up.bias"].detach()
    assert w0[0].item() == pytest.approx(-6.5) and w0[-1].item() == pytest.approx(-1.5) and (w0.diff() >= 0).all()
    assert torch.allclose(got["norm_weight"].detach(), torch.tensor(0.75**0.7))


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_families_with_norms_softcap_and_partial_rotary(family):
    model = convert(tiny_model(family), AttentionConfig(**CONFIG))
    _perturb(model)
    _decode_equals_full(model, _ids(1, 9))


def _layer_inputs(T=13):
    teacher = tiny_model("llama")
    hidden = torch.randn(2, T, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pe = teacher.model.rotary_emb(hidden, torch.arange(T)[None].expand(2, T))
    return hidden, pe


def test_with_its_learning_rate_at_zero_the_kind_is_gated_linear_attention():
    # icl = 0 and k_a = 0: b = 0 drops the low-rank part and k stays the teacher's, so the recurrence is GLA over the
    # teacher's rotated q/k and v with the kind's decays, followed by the per-head norm and the gate.
    hidden, pe = _layer_inputs()
    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG))
    _perturb(model)
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


def test_packed_sequences_equal_separate_forwards():
    hidden, _ = _layer_inputs(T=12)
    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG))
    _perturb(model)
    m = converted_modules(model)[0]
    one = hidden[:1]
    rotary = tiny_model("llama").model.rotary_emb
    # Each packed sequence restarts its positions.
    packed_pe = rotary(one, torch.cat([torch.arange(5), torch.arange(7)])[None])
    with torch.no_grad():
        packed = m.attention_heads(one, packed_pe, cu_seqlens=torch.tensor([0, 5, 12]))
        for a, b in ((0, 5), (5, 12)):
            alone = m.attention_heads(one[:, a:b], rotary(one, torch.arange(b - a)[None]))
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-6)


def test_left_padding_gives_the_unpadded_outputs():
    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG))
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


def test_a_hybrid_with_a_softmax_layer_decodes_as_it_prefills():
    model = convert(tiny_model("qwen3"), AttentionConfig(**CONFIG, softmax_layers=[2]))
    assert sorted(converted_modules(model)) == [0, 1, 3]
    _perturb(model)
    _decode_equals_full(model, _ids(2, 9))


def test_bad_options_are_refused_in_one_line():
    from linearize.errors import LinearizeError

    with pytest.raises(LinearizeError, match="rwkv7 ranks must be >= 0"):
        load_recipe("radlads", ["attention.options.decay_rank=-1"]).attention.kind_options()
    with pytest.raises(LinearizeError, match="attention.options.colour"):
        load_recipe("radlads", ["attention.options.colour=red"])


def test_the_cache_size_is_declared_and_constant():
    from linearize.attention import get_attention_kind

    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG))
    cache = _decode_equals_full(model, _ids(2, 9))
    kind = get_attention_kind("rwkv7")
    declared = kind.state_bytes(model.config, AttentionConfig(**CONFIG), 0, 9, 2, 4)
    assert cache.recurrent_layer(0).nbytes() == declared == kind.state_bytes(model.config, None, 0, 10_000, 2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fla_path_matches_the_torch_path_and_decodes_as_it_prefills(monkeypatch):
    from linearize.kernels.gla.fla_path import fla_version

    if fla_version() is None:
        pytest.skip("needs fla-core")
    model = convert(tiny_model("llama"), AttentionConfig(**CONFIG)).cuda().to(torch.bfloat16)
    _perturb(model)
    ids = _ids(2, 80).cuda()
    with torch.no_grad():
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        want = model(ids, use_cache=False).logits.float()
        monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
        got = model(ids, use_cache=False).logits.float()
        # Prefill past fla's 64-token switch (chunk kernel), then decode steps on its fused recurrent kernel.
        out = model(ids[:, :70], use_cache=True)
        cache, steps = output_cache(out), [out.logits.float()]
        for t in range(70, 80):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits.float())
    scale = want.pow(2).mean().sqrt()
    assert (got - want).pow(2).mean().sqrt() < 2e-2 * scale
    assert (torch.cat(steps, 1) - got).pow(2).mean().sqrt() < 2e-2 * scale
