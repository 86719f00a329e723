"""The gated delta rule: the chunked and step-by-step PyTorch paths and fla's kernels against naive.py.

Outputs, final states and every gradient (q, k, v, decays, write strengths, initial state) are compared with a
relative RMSE. fla's kernels are tested on the GPU only (its chunk kernels do not run under Triton's interpreter),
with flash-attention's bf16 rule.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from linearize.errors import LinearizeError
from linearize.kernels import delta as delta_mod
from linearize.kernels.delta import (
    fla_path,
    gated_delta_naive,
    gated_delta_recurrent_torch,
    gated_delta_rule,
)
from linearize.kernels.gla.fla_path import FLA_VERSIONS, fla_version


def rel_rmse(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_rel(actual, expected, tol, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    err = rel_rmse(actual, expected)
    assert err <= tol, f"{what}: relative RMSE {err:.2e} > {tol:.0e}"


def make_inputs(B, T, H, Hkv, K, V, Hg=None, gate_scale=1.0, dtype=torch.float32, device="cpu", seed=0, n_states=None):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    Hg = Hg or H
    q, k, v = rnd(B, T, H, K), rnd(B, T, Hkv, K), rnd(B, T, Hkv, V)
    g = F.logsigmoid(rnd(B, T, Hg) * gate_scale + 2) * gate_scale
    beta = torch.sigmoid(rnd(B, T, Hg))
    s0 = rnd(n_states or B, H, K, V) * 0.5
    return [t.to(dtype) for t in (q, k, v)] + [g.float(), beta.to(dtype), s0]


def run_with_grads(fn, leaves, seed=7):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, state = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    d_state = torch.randn(state.shape, generator=gen).to(state.device)
    loss = (out * d_out).sum() + (state * d_state).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


NAMES = ["output", "final state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"]

CASES = [
    pytest.param(1, 1, 2, 2, 16, 16, None, 64, id="B1-T1-H2-K16"),
    pytest.param(2, 63, 4, 2, 12, 12, None, 64, id="B2-T63-H4-Hkv2-K12"),
    pytest.param(2, 64, 2, 2, 8, 12, 2, 64, id="B2-T64-H2-K8-V12-boundary"),
    pytest.param(1, 65, 2, 1, 12, 8, 1, 64, id="B1-T65-H2-Hkv1-Hg1-boundary"),
    pytest.param(1, 40, 2, 2, 16, 16, None, 7, id="B1-T40-H2-C7"),
]


@pytest.mark.parametrize("path", ["chunk", "recurrent"])
@pytest.mark.parametrize("B,T,H,Hkv,K,V,Hg,chunk", CASES)
def test_paths_match_naive(monkeypatch, path, B, T, H, Hkv, K, V, Hg, chunk):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    if path == "recurrent":
        # The dispatcher takes the step-by-step path for decoding; here it takes it for every input and gradient.
        monkeypatch.setattr(
            delta_mod, "gated_delta_chunk_torch", lambda *a, chunk_size: gated_delta_recurrent_torch(*a)
        )
    leaves = make_inputs(B, T, H, Hkv, K, V, Hg)
    kw = dict(output_final_state=True, qk_l2norm=True)
    want = run_with_grads(lambda q, k, v, g, b, s: gated_delta_naive(q, k, v, g, b, initial_state=s, **kw), leaves)
    got = run_with_grads(
        lambda q, k, v, g, b, s: gated_delta_rule(q, k, v, g, b, initial_state=s, chunk_size=chunk, **kw), leaves
    )
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.shape == b.shape, name
        assert_rel(a, b, 1e-5, name)


def test_the_delta_rule_overwrites_what_a_key_stored():
    # With beta = 1, no decay and unit keys, writing v2 under the key that held v1 replaces it: the read gives v2.
    k = F.normalize(torch.randn(1, 1, 1, 8), dim=-1).expand(1, 2, 1, 8)
    v = torch.randn(1, 2, 1, 4)
    o, _ = gated_delta_naive(k, k, v, torch.zeros(1, 2, 1), torch.ones(1, 2, 1), scale=1.0)
    torch.testing.assert_close(o[:, 1], v[:, 1], rtol=1e-5, atol=1e-6)
    o, _ = gated_delta_rule(k, k, v, torch.zeros(1, 2, 1), torch.ones(1, 2, 1), scale=1.0, chunk_size=4)
    torch.testing.assert_close(o[:, 1], v[:, 1], rtol=1e-5, atol=1e-6)


def test_strong_decays_stay_finite_across_chunks(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    q, k, v, g, beta, s0 = make_inputs(1, 70, 2, 2, 8, 8, gate_scale=40.0)
    kw = dict(output_final_state=True, qk_l2norm=True)
    want = run_with_grads(
        lambda *t: gated_delta_naive(*t[:5], initial_state=t[5], **kw), [t.double() for t in (q, k, v, g, beta, s0)]
    )
    got = run_with_grads(lambda *t: gated_delta_rule(*t[:5], initial_state=t[5], chunk_size=64, **kw),
                         [q, k, v, g, beta, s0])  # fmt: skip
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(a).all(), name
        assert_rel(a, b, 1e-3, name)


def test_packed_sequences_equal_separate_calls(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    bounds = [0, 5, 37, 63]
    q, k, v, g, beta, s0 = make_inputs(1, 63, 4, 2, 12, 10, n_states=3)
    cu = torch.tensor(bounds)
    kw = dict(output_final_state=True, qk_l2norm=True, cu_seqlens=cu)
    leaves = [q, k, v, g, beta, s0]
    got = run_with_grads(lambda *t: gated_delta_rule(*t[:5], initial_state=t[5], **kw), leaves)
    want = run_with_grads(lambda *t: gated_delta_naive(*t[:5], initial_state=t[5], **kw), leaves)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert_rel(a, b, 1e-5, f"packed {name}")
    o, s = got[:2]
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        o_n, s_n = gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                    initial_state=s0[n : n + 1], output_final_state=True, qk_l2norm=True)  # fmt: skip
        assert_rel(o[:, a:b], o_n, 1e-6, f"sequence {n} output")
        assert_rel(s[n : n + 1], s_n, 1e-6, f"sequence {n} state")


def test_decoding_step_by_step_equals_the_full_forward(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    q, k, v, g, beta, _ = make_inputs(2, 45, 4, 2, 16, 8)
    kw = dict(output_final_state=True, qk_l2norm=True)
    with torch.no_grad():
        full, full_state = gated_delta_rule(q, k, v, g, beta, **kw)
        out, state = gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], **kw)
        steps = [out]
        for t in range(37, 45):
            sl = slice(t, t + 1)
            out, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state,
                                          **kw)  # fmt: skip
            steps.append(out)
    assert_rel(torch.cat(steps, 1), full, 1e-6, "decoded outputs")
    assert_rel(state, full_state, 1e-6, "state after decoding")


def test_left_padding_leaves_the_real_tokens_as_alone(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    q, k, v, g, beta, _ = make_inputs(1, 30, 2, 2, 8, 8)
    pad = 9
    # Padding tokens with large keys, strong decays and full writes: they must leave the state untouched.
    qp, kp, vp = (torch.cat([torch.full_like(x[:, :pad], 3.0), x], 1) for x in (q, k, v))
    gp = torch.cat([torch.full_like(g[:, :pad], -5.0), g], 1)
    bp = torch.cat([torch.ones_like(beta[:, :pad]), beta], 1)
    mask = torch.ones(1, 30 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    o_ref, s_ref = gated_delta_naive(q, k, v, g, beta, output_final_state=True, qk_l2norm=True)
    for run in (gated_delta_rule, gated_delta_naive):
        o, s = run(qp, kp, vp, gp, bp, output_final_state=True, token_mask=mask, qk_l2norm=True)
        assert_rel(o[:, pad:], o_ref, 1e-6, f"{run.__name__}: outputs of real tokens")
        assert_rel(s, s_ref, 1e-6, f"{run.__name__}: final state")


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 1, 4)
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    assert delta_mod.delta_backend(q) == "torch"
    monkeypatch.setattr(delta_mod, "kernel_choice", lambda: "triton")
    monkeypatch.setattr(delta_mod, "fla_version", lambda: None)
    with pytest.raises(LinearizeError, match="fla-core"):
        delta_mod.delta_backend(q)
    monkeypatch.setattr(delta_mod, "fla_version", lambda: "0.6.0")
    with pytest.raises(LinearizeError, match="CUDA tensors"):
        delta_mod.delta_backend(q)


def test_a_blocked_fla_backward_trains_on_pytorch_or_says_what_to_install(monkeypatch):
    class FakeCuda:
        is_cuda = True
        device = torch.device("cpu")

    monkeypatch.setattr(delta_mod, "fla_version", lambda: "0.6.0")
    monkeypatch.setattr(delta_mod, "backward_blocked", lambda index: True)
    monkeypatch.setattr(delta_mod, "kernel_choice", lambda: "auto")
    assert delta_mod.delta_backend(FakeCuda(), needs_grad=False) == "fla"
    assert delta_mod.delta_backend(FakeCuda(), needs_grad=True) == "torch"
    monkeypatch.setattr(delta_mod, "kernel_choice", lambda: "triton")
    with pytest.raises(LinearizeError, match="tilelang"):
        delta_mod.delta_backend(FakeCuda(), needs_grad=True)


needs_fla = pytest.mark.skipif(fla_version() is None, reason="needs fla-core")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_fla
def test_fla_signatures_match_the_pinned_version():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from packaging.specifiers import SpecifierSet

    assert fla_version() in SpecifierSet(FLA_VERSIONS)
    for fn, names in (
        (chunk_gated_delta_rule, fla_path.CHUNK_ARGS),
        (fused_recurrent_gated_delta_rule, fla_path.FUSED_RECURRENT_ARGS),
    ):
        params = inspect.signature(fn).parameters
        missing = [n for n in names if n not in params]
        assert not missing, f"{fn.__name__} lacks {missing}"


GPU_CASES = [
    pytest.param(2, 500, 4, 2, 64, 64, id="B2-T500-H4-Hkv2-K64"),
    pytest.param(1, 63, 2, 2, 64, 64, id="B1-T63-H2-K64"),
    pytest.param(2, 300, 4, 4, 128, 128, id="B2-T300-H4-K128"),
    pytest.param(1, 40, 4, 2, 64, 64, id="B1-T40-H4-Hkv2-K64-short"),
]


@cuda
@needs_fla
@pytest.mark.parametrize("B,T,H,Hkv,K,V", GPU_CASES)
def test_gpu_fla_bf16_within_twice_naive_bf16_error(monkeypatch, B, T, H, Hkv, K, V):
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    leaves = make_inputs(B, T, H, Hkv, K, V, dtype=torch.bfloat16, device="cuda", seed=3)
    if fla_path.backward_blocked(0):
        pytest.skip(f"fla refuses this backward on this GPU's Triton: {delta_mod.FIX}")
    kw = dict(output_final_state=True, qk_l2norm=True)
    want = run_with_grads(lambda q, k, v, g, b, s: gated_delta_naive(q.float(), k.float(), v.float(), g, b.float(),
                                                                     initial_state=s, **kw), leaves)  # fmt: skip
    low = run_with_grads(
        lambda q, k, v, g, b, s: gated_delta_naive(q, k, v, g, b, initial_state=s, upcast=False, **kw), leaves
    )
    got = run_with_grads(lambda q, k, v, g, b, s: gated_delta_rule(q, k, v, g, b, initial_state=s, **kw), leaves)
    assert delta_mod.delta_backend(leaves[0], needs_grad=True) == "fla"
    for name, a, b, ref in zip(NAMES, got, low, want, strict=True):
        assert not torch.isnan(a).any(), name
        kernel, naive = rel_rmse(a.float(), ref.float()), rel_rmse(b.float(), ref.float())
        assert kernel <= 2 * naive + 1e-3, f"{name}: fla {kernel:.2e} vs naive bf16 {naive:.2e}"


@cuda
@needs_fla
def test_gpu_fla_forward_packed_and_decoding_match_naive(monkeypatch):
    # Forward only, so it runs on every Triton: prefill with fla's chunk kernel, decode with its recurrent one.
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    q, k, v, g, beta, _ = make_inputs(1, 200, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 17, 150, 200], device="cuda")
    kw = dict(output_final_state=True, qk_l2norm=True)
    with torch.no_grad():
        o, s = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, **kw)
        o_ref, s_ref = gated_delta_naive(q.float(), k.float(), v.float(), g, beta.float(), cu_seqlens=cu, **kw)
        assert_rel(o.float(), o_ref, 2e-2, "packed output")
        assert_rel(s, s_ref, 2e-2, "packed states")
        out, state = gated_delta_rule(q[:, :150], k[:, :150], v[:, :150], g[:, :150], beta[:, :150], **kw)
        prefill_state, steps = state, [out]
        for t in range(150, 200):
            sl = slice(t, t + 1)
            out, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state,
                                          **kw)  # fmt: skip
            steps.append(out)
        full, full_state = gated_delta_naive(q.float(), k.float(), v.float(), g, beta.float(), **kw)
        # The PyTorch path continues from fla's state: one layout ([N, H, K, V]) on both.
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        rest, _ = gated_delta_rule(q[:, 150:], k[:, 150:], v[:, 150:], g[:, 150:], beta[:, 150:],
                                   initial_state=prefill_state, **kw)  # fmt: skip
    assert_rel(torch.cat(steps, 1).float(), full, 2e-2, "decoded outputs")
    assert_rel(state, full_state, 2e-2, "state after decoding")
    assert_rel(rest.float(), full[:, 150:], 2e-2, "PyTorch path after fla's prefill")
