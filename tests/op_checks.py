"""Checks the gated ops' tests share (`tests/kernels/test_gla.py`, `test_delta.py`, `test_rwkv7.py`): relative RMSE,
results with every gradient, flash-attention's bf16 rule, decoding token by token, packed sequences one by one."""

from __future__ import annotations

import inspect

import pytest
import torch

from linearize.kernels.gla.fla_path import FLA_VERSIONS, fla_version

needs_fla = pytest.mark.skipif(fla_version() is None, reason="needs fla-core")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# `B, T, H, Hkv, K, V` of the GPU tests of fla's kernels: long and short inputs (fla switches to its recurrent
# kernel at 64 tokens), GQA, K = 128.
GPU_CASES = [
    pytest.param(2, 500, 4, 2, 64, 64, id="B2-T500-H4-Hkv2-K64"),
    pytest.param(1, 63, 2, 2, 64, 64, id="B1-T63-H2-K64"),
    pytest.param(2, 300, 4, 4, 128, 128, id="B2-T300-H4-K128"),
    pytest.param(1, 40, 4, 2, 64, 64, id="B1-T40-H4-Hkv2-K64-short"),
]


def rel_rmse(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_rel(actual, expected, tol, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    err = rel_rmse(actual, expected)
    assert err <= tol, f"{what}: relative RMSE {err:.2e} > {tol:.0e}"


def run_with_grads(fn, leaves, seed=7):
    """`[output, final state, *gradients of each leaf]` of `fn(*leaves)` under a random loss on both results."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, state = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    d_state = torch.randn(state.shape, generator=gen).to(state.device)
    loss = (out * d_out).sum() + (state * d_state).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


def assert_all_rel(names, got, want, tol, finite=False):
    """Each result of `run_with_grads` within `tol` of the reference's (same shape; finite too with `finite`)."""
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, name
        if finite:
            assert torch.isfinite(a).all(), name
        assert_rel(a, b, tol, name)


def assert_within_twice_naive_error(names, got, low, want, cap=None):
    """flash-attention's rule for a 16-bit kernel: its error against the fp32 reference `want` at most twice (plus
    1e-3) that of the naive op run in the same precision (`low`); with `cap`, at most `cap` besides."""
    for name, a, b, ref in zip(names, got, low, want, strict=True):
        assert not torch.isnan(a).any(), name
        kernel, naive = rel_rmse(a.float(), ref.float()), rel_rmse(b.float(), ref.float())
        assert kernel <= 2 * naive + 1e-3, f"{name}: fla {kernel:.2e} vs naive bf16 {naive:.2e}"
        if cap is not None:
            assert kernel <= cap, f"{name}: fla {kernel:.2e}"


def decode_in_steps(run, tensors, prefill, **kw):
    """`run` over the first `prefill` tokens of the `[B, T, ...]` inputs, then one token at a time from the state it
    returns: (the outputs along T, the last state). `kw` goes to every call, with `output_final_state=True`."""
    with torch.no_grad():
        out, state = run(*(x[:, :prefill] for x in tensors), output_final_state=True, **kw)
        steps = [out]
        for t in range(prefill, tensors[0].shape[1]):
            out, state = run(*(x[:, t : t + 1] for x in tensors), initial_state=state, output_final_state=True, **kw)
            steps.append(out)
    return torch.cat(steps, 1), state


def assert_decodes_as_full(run, tensors, prefill, **kw):
    """`decode_in_steps` gives the outputs and the final state of one call over all the tokens."""
    with torch.no_grad():
        full, full_state = run(*tensors, output_final_state=True, **kw)
    decoded, state = decode_in_steps(run, tensors, prefill, **kw)
    assert_rel(decoded, full, 1e-6, "decoded outputs")
    assert_rel(state, full_state, 1e-6, "state after decoding")


def left_padded(tensors, pad, fills):
    """The `[1, T, ...]` inputs with `pad` tokens before them, each input's filled with its value of `fills`, and the
    `[1, pad + T]` token mask, False on the padding."""
    padded = [torch.cat([torch.full_like(x[:, :pad], fill), x], 1) for x, fill in zip(tensors, fills, strict=True)]
    mask = torch.ones(1, pad + tensors[0].shape[1], dtype=torch.bool)
    mask[:, :pad] = False
    return padded, mask


def assert_padding_is_left_alone(runs, tensors, pad, fills, reference, **kw):
    """Each of `runs` over the left-padded inputs (`left_padded`) gives, on the real tokens, the output and the final
    state `reference` gives without the padding."""
    padded, mask = left_padded(tensors, pad, fills)
    o_ref, s_ref = reference(*tensors, output_final_state=True, **kw)
    for run in runs:
        o, s = run(*padded, output_final_state=True, token_mask=mask, **kw)
        assert_rel(o[:, pad:], o_ref, 1e-6, f"{run.__name__}: outputs of real tokens")
        assert_rel(s, s_ref, 1e-6, f"{run.__name__}: final state")


def assert_sequences_alone(o, s, bounds, run, tensors, s0, tol, **kw):
    """Packed results `o` (`[1, T, ...]`) and `s` (`[N, ...]`) equal `run` over each sequence of `bounds` on its own,
    from its row of `s0`."""
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        o_n, s_n = run(*(x[:, a:b] for x in tensors), initial_state=s0[n : n + 1], output_final_state=True, **kw)
        assert_rel(o[:, a:b], o_n, tol, f"sequence {n} output")
        assert_rel(s[n : n + 1], s_n, tol, f"sequence {n} state")


def assert_fla_signatures(*pairs):
    """The installed fla-core is a pinned version, and each `(op, argument names)` pair's op takes those names."""
    from packaging.specifiers import SpecifierSet

    assert fla_version() in SpecifierSet(FLA_VERSIONS)
    for fn, names in pairs:
        params = inspect.signature(fn).parameters
        missing = [n for n in names if n not in params]
        assert not missing, f"{fn.__name__} lacks {missing}"
