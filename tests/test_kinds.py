"""A kind is one declaration: a new kind registered from outside the package converts, trains its own new
parameters, decodes through its own state, reloads and is skipped by controls it does not declare, with no edit to
the pipeline, the cache, export or the controls."""

from dataclasses import dataclass

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from linearize import AttentionConfig, convert
from linearize._compat import CACHE_KWARG, output_cache, pop_cache
from linearize.attention import (
    ATTENTION_KINDS,
    AttentionKind,
    ConvertedAttention,
    LinearizeCache,
    RecurrentLayer,
    converted_modules,
    register_attention_kind,
)
from linearize.attention.projection import project_qkv, rope_function
from linearize.eval.controls import attention_variant, has_both_branches


@dataclass(frozen=True)
class ToyState:
    """Running sums of phi(k) v^T `[B, H, F, Dv]` and phi(k) `[B, H, F]`."""

    kv: torch.Tensor
    k: torch.Tensor

    def index_select(self, idx):
        return ToyState(self.kv.index_select(0, idx), self.k.index_select(0, idx))

    def repeat_interleave(self, n):
        return ToyState(self.kv.repeat_interleave(n, 0), self.k.repeat_interleave(n, 0))

    def to(self, device):
        return ToyState(self.kv.to(device), self.k.to(device))

    def tensors(self):
        return [self.kv, self.k]


class ToyLinear(ConvertedAttention):
    """Normalised linear attention with phi(x) = elu(x W) + 1, W per head (the only new parameter)."""

    def __init__(self, original, cfg, layer_idx):
        super().__init__(original, layer_idx)
        self.num_heads, self.num_kv_heads = original.config.num_attention_heads, original.config.num_key_value_heads
        self.head_dim, self.scaling, self.rope = original.head_dim, original.scaling, rope_function(original)
        self.proj = nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.head_dim))
        self.reset_new_parameters()

    def reset_new_parameters(self, names=None):
        with torch.no_grad():
            self.proj.copy_(torch.eye(self.head_dim).expand_as(self.proj))

    def attention_heads(self, hidden_states, position_embeddings, token_mask=None, cache=None, cu_seqlens=None):
        q, k, v = project_qkv(self, hidden_states, position_embeddings)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, 2).float(), v.repeat_interleave(groups, 2).float()
        fq = torch.nn.functional.elu(torch.einsum("bthd,hdf->bthf", q.float(), self.proj)) + 1
        fk = torch.nn.functional.elu(torch.einsum("bthd,hdf->bthf", k, self.proj)) + 1
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        B, T, H, F = fq.shape
        kv0 = fq.new_zeros(B, H, F, v.shape[-1]) if layer is None or layer.state is None else layer.state.kv
        k0 = fq.new_zeros(B, H, F) if layer is None or layer.state is None else layer.state.k
        kv = kv0[:, None] + torch.einsum("bthf,bthd->bthfd", fk, v).cumsum(1)
        ks = k0[:, None] + fk.cumsum(1)
        out = torch.einsum("bthf,bthfd->bthd", fq, kv) / torch.einsum("bthf,bthf->bth", fq, ks)[..., None]
        if layer is not None:
            layer.advance(ToyState(kv[:, -1], ks[:, -1]), T)
        return out.to(hidden_states.dtype).reshape(B, T, -1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        heads = self.attention_heads(hidden_states, position_embeddings, cache=pop_cache(kwargs))
        return self.o_proj(heads), None


class ToyLayer(RecurrentLayer):
    """The kind's own cache slot (here only to show that the cache builds what the kind declares)."""


@dataclass
class ToyOptions:
    gain: float = 1.0


@pytest.fixture
def toy_kind():
    kind = register_attention_kind(
        AttentionKind(
            name="toy",
            description="test kind",
            uses_window=False,
            build=ToyLinear,
            cache_layer=ToyLayer,
            options=ToyOptions,
        )
    )
    yield kind
    del ATTENTION_KINDS["toy"]


def test_a_kind_registered_elsewhere_converts_trains_decodes_and_reloads(toy_kind, tmp_path):
    model = convert(tiny_model("llama"), AttentionConfig(kind="toy", softmax_layers=[1]))
    modules = converted_modules(model)
    assert sorted(modules) == [0, 2, 3] and all(type(m) is ToyLinear for m in modules.values())
    # The new parameters are what the kind added, not the adopted projections.
    assert all(list(m.named_new_parameters()) == ["proj"] for m in modules.values())
    with torch.no_grad():
        for m in modules.values():
            m.proj.add_(0.2 * torch.randn_like(m.proj))

    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :4], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            steps.append(out.logits)
    assert isinstance(cache, LinearizeCache)
    assert [type(layer).__name__ for layer in cache.layers] == ["ToyLayer", "DynamicLayer", "ToyLayer", "ToyLayer"]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)

    # Controls are the kind's: this one declares none, so they change nothing.
    assert not has_both_branches(model)
    with torch.no_grad(), attention_variant(model, "window-only"):
        torch.testing.assert_close(model(ids, use_cache=False).logits, full)

    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, full)
    # A teacher checkpoint into the converted skeleton: the kind's start is restored for what it lacks.
    teacher = tiny_model("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    skeleton = type(model).from_pretrained(tmp_path / "teacher", config=model.config)
    for m in converted_modules(skeleton).values():
        assert torch.equal(m.proj, torch.eye(m.head_dim).expand_as(m.proj))


def test_registering_a_module_without_a_cache_layer_is_refused():
    with pytest.raises(ValueError, match="declares no cache_layer"):
        register_attention_kind(AttentionKind(name="bad", description="", uses_window=False, build=ToyLinear))
    assert "bad" not in ATTENTION_KINDS


def test_kind_options_are_checked_against_the_kinds_dataclass(toy_kind):
    from linearize.config import load_recipe
    from linearize.errors import LinearizeError

    recipe = load_recipe("lolcats", ["attention.kind=toy", "attention.options.gain=2"])
    assert recipe.attention.kind_options() == ToyOptions(gain=2.0)
    with pytest.raises(LinearizeError, match="unknown recipe key 'attention.options.colour'"):
        load_recipe("lolcats", ["attention.kind=toy", "attention.options.colour=red"])
    with pytest.raises(LinearizeError, match="kind 'lolcats' takes no options"):
        load_recipe("lolcats", ["attention.options.gain=2"])


BUNDLED = sorted(name for name, kind in ATTENTION_KINDS.items() if kind.build is not None)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_kind_keeps_the_contract(name):
    # What the pipeline, the cache, export and the controls rely on, for every registered kind.
    from linearize.attention import get_attention_kind, kind_of

    kind = get_attention_kind(name)
    assert "naive" in kind.ops, "each kind names the PyTorch ground truth of its ops"
    teacher = tiny_model("llama")
    teacher_keys = set(teacher.state_dict())
    model = convert(tiny_model("llama"), AttentionConfig(kind=name, window=4, feature_dim=8, chunk_size=4))
    modules = converted_modules(model)
    assert sorted(modules) == [0, 1, 2, 3] and all(kind_of(m) is kind for m in modules.values())
    new = {f"model.layers.{i}.self_attn.{n}" for i, m in modules.items() for n in m.named_new_parameters()}
    # A kind may add nothing (liger's gate and features are the teacher's own); whatever it adds is declared new.
    assert set(model.state_dict()) == teacher_keys | new and not new & teacher_keys

    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = model(ids, use_cache=False).logits
        for m in modules.values():
            for p in m.new_parameters():
                p.add_(0.1 * torch.randn_like(p))
        trained = model(ids, use_cache=False).logits
        for variant in kind.controls:
            with attention_variant(model, variant):
                assert not torch.allclose(model(ids, use_cache=False).logits, trained), variant
            torch.testing.assert_close(model(ids, use_cache=False).logits, trained)
        out = model(ids[:, :3], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(3, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
        torch.testing.assert_close(torch.cat(steps, 1), trained, rtol=1e-4, atol=1e-5)
        for m in modules.values():
            m.reset_new_parameters()
        torch.testing.assert_close(model(ids, use_cache=False).logits, start, rtol=0, atol=0)
