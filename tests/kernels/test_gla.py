"""Gated linear attention: the chunked and step-by-step PyTorch paths and fla's kernels against naive.py.

Outputs, final states and every gradient (q, k, v, gates, initial state) are compared with a relative RMSE.
fla's chunk kernels do not run under Triton's interpreter (`tl.program_id(...).to` fails there), so fla is
tested on the GPU only, with flash-attention's bf16 rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import (
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
from linearize.kernels import gla as gla_mod
from linearize.kernels.gla import fla_path, gated_linear_attention, gla_naive, gla_recurrent_torch


def make_inputs(B, T, H, Hkv, K, V, normalize=False, gate_scale=1.0, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q, k, v = rnd(B, T, H, K), rnd(B, T, Hkv, K), rnd(B, T, Hkv, V)
    if normalize:
        # Normalised GLA runs on non-negative features.
        q, k = q.softmax(-1), k.softmax(-1)
    g = F.logsigmoid(rnd(B, T, Hkv, K) * gate_scale + 2) * gate_scale
    s0 = rnd(B, H, K, V + normalize).abs() * 0.5
    return [t.to(dtype) for t in (q, k, v)] + [g.to(dtype), s0]


NAMES = ["output", "final state", "dq", "dk", "dv", "dg", "dinitial_state"]

CASES = [
    pytest.param(1, 1, 2, 2, 16, 16, False, 32, id="B1-T1-H2-K16"),
    pytest.param(2, 63, 4, 2, 60, 60, False, 32, id="B2-T63-H4-Hkv2-K60"),
    pytest.param(2, 64, 2, 2, 16, 24, False, 32, id="B2-T64-H2-K16-V24-boundary"),
    pytest.param(1, 65, 2, 1, 12, 8, False, 32, id="B1-T65-H2-Hkv1-K12-boundary"),
    pytest.param(2, 33, 4, 2, 20, 12, True, 16, id="B2-T33-H4-Hkv2-K20-normalised"),
    pytest.param(1, 40, 2, 2, 16, 16, False, 7, id="B1-T40-H2-C7"),
]


@pytest.mark.parametrize("path", ["chunk", "recurrent"])
@pytest.mark.parametrize("B,T,H,Hkv,K,V,normalize,chunk", CASES)
def test_paths_match_naive(monkeypatch, path, B, T, H, Hkv, K, V, normalize, chunk):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    if path == "recurrent":
        # The dispatcher takes the step-by-step path for decoding; here it takes it for every input and gradient.
        monkeypatch.setattr(gla_mod, "gla_chunk_torch", lambda *a, chunk_size: gla_recurrent_torch(*a))
    leaves = make_inputs(B, T, H, Hkv, K, V, normalize)
    kw = dict(normalize=normalize, output_final_state=True)
    want = run_with_grads(lambda q, k, v, g, s: gla_naive(q, k, v, g, None, initial_state=s, **kw), leaves)
    got = run_with_grads(
        lambda q, k, v, g, s: gated_linear_attention(q, k, v, g, initial_state=s, chunk_size=chunk, **kw), leaves
    )
    assert_all_rel(NAMES, got, want, 1e-5)


def test_strong_gates_stay_finite_across_chunks(monkeypatch):
    # Decays of e^-40 per step overflow any factorisation exp(G_i) * exp(-G_j) within a chunk.
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    q, k, v, g, s0 = make_inputs(1, 70, 2, 2, 8, 8, gate_scale=40.0)
    # The naive op's global gate sums lose their small differences in fp32 at this strength: it runs in fp64.
    want = run_with_grads(
        lambda *t: gla_naive(*t[:4], initial_state=t[4], output_final_state=True),
        [t.double() for t in (q, k, v, g, s0)],
    )
    got = run_with_grads(
        lambda *t: gated_linear_attention(*t[:4], initial_state=t[4], output_final_state=True, chunk_size=32),
        [q, k, v, g, s0],
    )
    # Gate sums of ~1000 within a chunk keep ~1e-4 of absolute precision in fp32, as in fla's kernels.
    assert_all_rel(NAMES, got, want, 1e-3, finite=True)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalised"])
def test_packed_sequences_equal_separate_calls(monkeypatch, normalize):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    bounds = [0, 5, 37, 63]
    q, k, v, g, _ = make_inputs(1, 63, 4, 2, 12, 10, normalize)
    s0 = torch.rand(3, 4, 12, 10 + normalize)
    cu = torch.tensor(bounds)
    o, s = gated_linear_attention(q, k, v, g, normalize=normalize, initial_state=s0, output_final_state=True,
                                  cu_seqlens=cu)  # fmt: skip
    o_ref, s_ref = gla_naive(q, k, v, g, normalize=normalize, initial_state=s0, output_final_state=True,
                             cu_seqlens=cu)  # fmt: skip
    assert_rel(o, o_ref, 1e-5, "packed output vs naive")
    assert_rel(s, s_ref, 1e-5, "packed states vs naive")
    assert_sequences_alone(o, s, bounds, gated_linear_attention, (q, k, v, g), s0, 1e-6, normalize=normalize)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalised"])
def test_decoding_step_by_step_equals_the_full_forward(monkeypatch, normalize):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(2, 45, 4, 2, 16, 8, normalize)
    assert_decodes_as_full(gated_linear_attention, tensors, 37, normalize=normalize)


def test_left_padding_leaves_the_real_tokens_as_alone(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    *tensors, _ = make_inputs(1, 30, 2, 2, 8, 8, normalize=True)
    # Padding tokens with large keys and strong gates: they must neither add to the state nor decay it.
    runs = (gated_linear_attention, gla_naive)
    assert_padding_is_left_alone(runs, tensors, 9, (3.0, 3.0, 3.0, -5.0), gla_naive, normalize=True)


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 1, 4)
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    assert gla_mod.gla_backend(q) == "torch"
    monkeypatch.setattr(fla_path, "fla_version", lambda: None)
    monkeypatch.setattr(gla_mod, "fla_version", lambda: None)
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    monkeypatch.setattr(gla_mod, "kernel_choice", lambda: "triton")
    with pytest.raises(LinearizeError, match="fla-core"):
        gla_mod.gla_backend(q)
    monkeypatch.setattr(gla_mod, "fla_version", lambda: "0.6.0")
    with pytest.raises(LinearizeError, match="CUDA tensors"):
        gla_mod.gla_backend(q)


def test_gpu_extra_pins_the_checked_fla_versions():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert f"fla-core{fla_path.FLA_VERSIONS}" in pyproject["project"]["optional-dependencies"]["gpu"]


@needs_fla
def test_fla_signatures_match_the_pinned_version():
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    assert_fla_signatures(
        (chunk_gla, fla_path.CHUNK_GLA_ARGS), (fused_recurrent_gla, fla_path.FUSED_RECURRENT_GLA_ARGS)
    )


GPU_CASES = [
    pytest.param(2, 500, 4, 2, 64, 64, False, id="B2-T500-H4-Hkv2-K64"),
    pytest.param(1, 63, 2, 2, 60, 60, False, id="B1-T63-H2-K60"),
    pytest.param(2, 300, 4, 4, 128, 128, True, id="B2-T300-H4-K128-normalised"),
    pytest.param(1, 40, 4, 2, 64, 64, False, id="B1-T40-H4-Hkv2-K64-short"),
]


@cuda
@needs_fla
@pytest.mark.parametrize("B,T,H,Hkv,K,V,normalize", GPU_CASES)
def test_gpu_fla_bf16_within_twice_naive_bf16_error(monkeypatch, B, T, H, Hkv, K, V, normalize):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    leaves = make_inputs(B, T, H, Hkv, K, V, normalize, dtype=torch.bfloat16, device="cuda", seed=3)
    leaves[3], leaves[4] = leaves[3].float(), leaves[4].float()
    kw = dict(normalize=normalize, output_final_state=True)
    want = run_with_grads(lambda q, k, v, g, s: gla_naive(q.float(), k.float(), v.float(), g, None,
                                                          initial_state=s, **kw), leaves)  # fmt: skip
    low = run_with_grads(lambda q, k, v, g, s: gla_naive(q, k, v, g, None, initial_state=s, upcast=False, **kw),
                         leaves)  # fmt: skip
    got = run_with_grads(lambda q, k, v, g, s: gated_linear_attention(q, k, v, g, initial_state=s, **kw), leaves)
    assert gla_mod.gla_backend(leaves[0]) == "fla"
    assert_within_twice_naive_error(NAMES, got, low, want)


@cuda
@needs_fla
def test_gpu_fla_packed_and_decoding_match_naive(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    q, k, v, g, _ = make_inputs(1, 200, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    g = g.float()
    tensors = (q, k, v, g)
    cu = torch.tensor([0, 17, 150, 200], device="cuda")
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = gla_naive(q.float(), k.float(), v.float(), g, output_final_state=True, cu_seqlens=cu)
    assert_rel(o.float(), o_ref, 2e-2, "packed output")
    assert_rel(s, s_ref, 2e-2, "packed states")
    decoded, state = decode_in_steps(gated_linear_attention, tensors, 150)
    full, full_state = gla_naive(q.float(), k.float(), v.float(), g, output_final_state=True)
    assert_rel(decoded.float(), full, 2e-2, "decoded outputs")
    assert_rel(state, full_state, 2e-2, "state after decoding")
