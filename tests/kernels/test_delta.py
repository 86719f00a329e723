"""The gated delta rule: the chunked and step-by-step PyTorch paths and fla's kernels against naive.py.

Outputs, final states and every gradient (q, k, v, decays, write strengths, initial state) are compared with a
relative RMSE. fla's kernels are tested on the GPU only (its chunk kernels do not run under Triton's interpreter),
with flash-attention's bf16 rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import (
    GPU_CASES,
    assert_all_rel,
    assert_decodes_as_full,
    assert_fla_signatures,
    assert_padding_is_left_alone,
    assert_rel,
    assert_sequences_alone,
    assert_within_twice_naive_error,
    cuda,
    decode_in_steps,
    needs_fla,
    run_with_grads,
)

from linearize.errors import LinearizeError
from linearize.kernels import delta as delta_mod
from linearize.kernels.delta import (
    fla_path,
    gated_delta_naive,
    gated_delta_recurrent_torch,
    gated_delta_rule,
)


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
    assert_all_rel(NAMES, got, want, 1e-5)


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
    assert_all_rel(NAMES, got, want, 1e-3, finite=True)


def test_packed_sequences_equal_separate_calls(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    bounds = [0, 5, 37, 63]
    q, k, v, g, beta, s0 = make_inputs(1, 63, 4, 2, 12, 10, n_states=3)
    cu = torch.tensor(bounds)
    kw = dict(output_final_state=True, qk_l2norm=True, cu_seqlens=cu)
    leaves = [q, k, v, g, beta, s0]
    got = run_with_grads(lambda *t: gated_delta_rule(*t[:5], initial_state=t[5], **kw), leaves)
    want = run_with_grads(lambda *t: gated_delta_naive(*t[:5], initial_state=t[5], **kw), leaves)
    assert_all_rel(NAMES, got, want, 1e-5)
    assert_sequences_alone(*got[:2], bounds, gated_delta_rule, leaves[:5], s0, 1e-6, qk_l2norm=True)


def test_decoding_step_by_step_equals_the_full_forward(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(2, 45, 4, 2, 16, 8)
    assert_decodes_as_full(gated_delta_rule, tensors, 37, qk_l2norm=True)


def test_left_padding_leaves_the_real_tokens_as_alone(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(1, 30, 2, 2, 8, 8)
    # Padding tokens with large keys, strong decays and full writes: they must leave the state untouched.
    runs = (gated_delta_rule, gated_delta_naive)
    assert_padding_is_left_alone(runs, tensors, 9, (3.0, 3.0, 3.0, -5.0, 1.0), gated_delta_naive, qk_l2norm=True)


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


@needs_fla
def test_fla_signatures_match_the_pinned_version():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    assert_fla_signatures(
        (chunk_gated_delta_rule, fla_path.CHUNK_ARGS), (fused_recurrent_gated_delta_rule, fla_path.FUSED_RECURRENT_ARGS)
    )


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
    assert_within_twice_naive_error(NAMES, got, low, want)


@cuda
@needs_fla
def test_gpu_fla_forward_packed_and_decoding_match_naive(monkeypatch):
    # Forward only, so it runs on every Triton: prefill with fla's chunk kernel, decode with its recurrent one.
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    *tensors, _ = make_inputs(1, 200, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    q, k, v, g, beta = tensors
    cu = torch.tensor([0, 17, 150, 200], device="cuda")
    kw = dict(output_final_state=True, qk_l2norm=True)
    with torch.no_grad():
        o, s = gated_delta_rule(*tensors, cu_seqlens=cu, **kw)
        o_ref, s_ref = gated_delta_naive(q.float(), k.float(), v.float(), g, beta.float(), cu_seqlens=cu, **kw)
        assert_rel(o.float(), o_ref, 2e-2, "packed output")
        assert_rel(s, s_ref, 2e-2, "packed states")
        decoded, state = decode_in_steps(gated_delta_rule, tensors, 150, qk_l2norm=True)
        _, prefill_state = gated_delta_rule(*(x[:, :150] for x in tensors), **kw)
        full, full_state = gated_delta_naive(q.float(), k.float(), v.float(), g, beta.float(), **kw)
        # The PyTorch path continues from fla's state: one layout ([N, H, K, V]) on both.
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        rest, _ = gated_delta_rule(*(x[:, 150:] for x in tensors), initial_state=prefill_state, **kw)
    assert_rel(decoded.float(), full, 2e-2, "decoded outputs")
    assert_rel(state, full_state, 2e-2, "state after decoding")
    assert_rel(rest.float(), full[:, 150:], 2e-2, "PyTorch path after fla's prefill")
