"""The RWKV-7 recurrence: the chunked and step-by-step PyTorch paths and fla's kernels against naive.py.

Outputs, final states and every gradient (r, w, k, v, a, b, initial state) are compared with a relative RMSE.
fla's kernels are tested on the GPU only, with flash-attention's bf16 rule.
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

from linearize.kernels import rwkv7 as rwkv7_mod
from linearize.kernels.rwkv7 import chunk as rwkv7_chunk
from linearize.kernels.rwkv7 import fla_path, rwkv7_attention, rwkv7_naive, rwkv7_recurrent_torch


def make_inputs(B, T, H, Hkv, K, V, N=None, decay=1.0, dtype=torch.float32, device="cpu", seed=0):
    """RWKV-7's own parametrisation: a = -kk, b = kk * iclr with kk unit per head, log decays in [-0.61, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    r, k, v = rnd(B, T, H, K), rnd(B, T, Hkv, K) * 0.5, rnd(B, T, Hkv, V)
    w = -0.6065 * decay * torch.sigmoid(rnd(B, T, H, K) - 1)
    kk = F.normalize(rnd(B, T, H, K), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, K))
    s0 = rnd(N or B, H, K, V) * 0.5
    return [t.to(device, dtype) for t in (r, w, k, v, a, b)] + [s0.to(device)]


NAMES = ["output", "final state", "dr", "dw", "dk", "dv", "da", "db", "dinitial_state"]

CASES = [
    pytest.param(1, 1, 2, 2, 8, 8, 16, id="B1-T1-H2-K8"),
    pytest.param(2, 33, 4, 2, 12, 10, 16, id="B2-T33-H4-Hkv2-K12-V10"),
    pytest.param(1, 32, 2, 1, 8, 8, 16, id="B1-T32-Hkv1-boundary"),
    pytest.param(1, 23, 2, 2, 8, 6, 7, id="B1-T23-C7"),
]


@pytest.mark.parametrize("path", ["chunk", "chunk-unsplit", "recurrent"])
@pytest.mark.parametrize("B,T,H,Hkv,K,V,chunk", CASES)
def test_paths_match_naive(monkeypatch, path, B, T, H, Hkv, K, V, chunk):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    if path == "chunk-unsplit":
        # Decays too strong to split exp(G_i - G_j) into two factors take the differences first; here every chunk.
        monkeypatch.setattr(rwkv7_chunk, "MAX_FACTORED_DECAY", -1.0)
    if path == "recurrent":
        # The dispatcher takes the step-by-step path for decoding; here it takes it for every input and gradient.
        monkeypatch.setattr(rwkv7_mod, "rwkv7_chunk_torch", lambda *args, chunk_size: rwkv7_recurrent_torch(*args))
    leaves = make_inputs(B, T, H, Hkv, K, V)
    want = run_with_grads(lambda *t: rwkv7_naive(*t[:6], 0.5, t[6], True), leaves)
    got = run_with_grads(lambda *t: rwkv7_attention(*t[:6], 0.5, t[6], True, chunk_size=chunk), leaves)
    assert_all_rel(NAMES, got, want, 1e-5)


def test_strong_decays_stay_finite_across_chunks(monkeypatch):
    # Log decays down to -24 per step: a chunk's sums reach hundreds, which exp(G_i) * exp(-G_j) would overflow.
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    leaves = make_inputs(1, 40, 2, 2, 8, 8, decay=40.0)
    want = run_with_grads(lambda *t: rwkv7_naive(*t[:6], 1.0, t[6], True), [t.double() for t in leaves])
    got = run_with_grads(lambda *t: rwkv7_attention(*t[:6], 1.0, t[6], True, chunk_size=32), leaves)
    assert_all_rel(NAMES, got, want, 1e-4, finite=True)


def test_packed_sequences_equal_separate_calls(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    bounds = [0, 5, 30, 41]
    *tensors, s0 = make_inputs(1, 41, 4, 2, 8, 6, N=3)
    cu = torch.tensor(bounds)
    o, s = rwkv7_attention(*tensors, 1.0, s0, True, cu_seqlens=cu, chunk_size=16)
    o_ref, s_ref = rwkv7_naive(*tensors, 1.0, s0, True, cu_seqlens=cu)
    assert_rel(o, o_ref, 1e-5, "packed output vs naive")
    assert_rel(s, s_ref, 1e-5, "packed states vs naive")
    assert_sequences_alone(o, s, bounds, rwkv7_naive, tensors, s0, 1e-5, scale=1.0)


def test_decoding_step_by_step_equals_the_full_forward(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(2, 45, 4, 2, 8, 8)
    assert_decodes_as_full(rwkv7_attention, tensors, 37, scale=1.0)


def test_left_padding_leaves_the_real_tokens_as_alone(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(1, 20, 2, 2, 8, 8)
    # Padding tokens with large keys, strong decays (w) and a full-strength removal: none of it may reach the state.
    fills = (2.0, -5.0, 2.0, 2.0, 2.0, 2.0)
    assert_padding_is_left_alone((rwkv7_attention, rwkv7_naive), tensors, 6, fills, rwkv7_naive, scale=1.0)


def test_the_transition_removes_what_a_key_stored():
    # One head, a = -k, b = k (unit k, iclr 1), no decay: writing v2 on the key that held v1 replaces v1.
    k = F.normalize(torch.randn(1, 1, 1, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    keys = k.expand(1, 2, 1, 4)
    values = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])
    o, _ = rwkv7_naive(keys, torch.zeros_like(keys), keys, values, -keys, keys)
    torch.testing.assert_close(o[0, 1, 0], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)


@needs_fla
def test_fla_signatures_match_the_pinned_version():
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    assert_fla_signatures(
        (chunk_rwkv7, fla_path.CHUNK_RWKV7_ARGS), (fused_recurrent_rwkv7, fla_path.FUSED_RECURRENT_RWKV7_ARGS)
    )


@cuda
@needs_fla
@pytest.mark.parametrize("B,T,H,Hkv,K,V", GPU_CASES)
def test_gpu_fla_bf16_within_twice_naive_bf16_error(monkeypatch, B, T, H, Hkv, K, V):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    leaves = make_inputs(B, T, H, Hkv, K, V, dtype=torch.bfloat16, device="cuda", seed=3)
    leaves[1] = leaves[1].float()
    want = run_with_grads(lambda *t: rwkv7_naive(*(x.float() for x in t[:6]), 1.0, t[6], True), leaves)
    low = run_with_grads(lambda *t: rwkv7_naive(*t[:6], 1.0, t[6], True, upcast=False), leaves)
    got = run_with_grads(lambda *t: rwkv7_attention(*t[:6], 1.0, t[6], True), leaves)
    assert rwkv7_mod.gla_backend(leaves[0]) == "fla"
    # A state carried in bf16 through hundreds of steps drifts far, so the rule alone is lenient: fla keeps its state
    # in fp32, and is held to a few percent besides.
    assert_within_twice_naive_error(NAMES, got, low, want, cap=5e-2)


@cuda
@needs_fla
def test_gpu_fla_packed_and_decoding_match_naive(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    *tensors, _ = make_inputs(1, 200, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    tensors[1] = tensors[1].float()
    ref_inputs = [t.float() for t in tensors]
    cu = torch.tensor([0, 17, 150, 200], device="cuda")
    o, s = rwkv7_attention(*tensors, 1.0, None, True, cu_seqlens=cu)
    o_ref, s_ref = rwkv7_naive(*ref_inputs, 1.0, None, True, cu_seqlens=cu)
    assert_rel(o.float(), o_ref, 2e-2, "packed output")
    assert_rel(s, s_ref, 2e-2, "packed states")
    decoded, state = decode_in_steps(rwkv7_attention, tensors, 150, scale=1.0)
    full, full_state = rwkv7_naive(*ref_inputs, 1.0, None, True)
    assert_rel(decoded.float(), full, 2e-2, "decoded outputs")
    assert_rel(state, full_state, 2e-2, "state after decoding")
