"""The Triton decode step's new state against the PyTorch path: window keys, values and mask, kv and ksum.

`hybrid_decode_triton` writes the whole new state in its one launch (the shifted window included), so every element
of every state tensor is compared here, with the kernel's buffers NaN-poisoned so that an element no program writes
fails. The input state must come out untouched (beam search and retries reuse it). On CPU the kernel runs under the
Triton interpreter, set up as in test_hybrid_triton.py: in this process when triton was not imported yet, otherwise
in a subprocess.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from linearize.kernels.hybrid import HybridState, hybrid_attention_chunked  # noqa: E402

INTERPRETED = type(triton.language.standard.zeros).__name__ == "InterpretedFunction"
MODULE = "linearize.kernels.hybrid.triton_recurrent"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in a subprocess under TRITON_INTERPRET=1")


def _nan_empty(*shape, dtype=torch.float32, device=None):
    if dtype == torch.bool:
        # No NaN for bools: the opposite of what most slots should hold, and random, so a missed write shows.
        return torch.randint(0, 2, shape, device=device).bool()
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def recurrent(monkeypatch):
    """The freshly imported (interpreted) kernel module, its buffers NaN-poisoned."""
    mod = importlib.reload(importlib.import_module(MODULE))
    monkeypatch.setattr(mod, "_empty", _nan_empty)
    return mod


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests run in this process")
def test_interpreter_tests_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def rel_rmse(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def make_inputs(B, T, H, Hkv, D, F, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    q, k, v = (rnd(B, T, n, d).to(dtype) for n, d in ((H, D), (Hkv, D), (Hkv, Dv)))
    wq, wk = rnd(H, D, F, s=D**-0.5 * 2), rnd(H, D, F, s=D**-0.5 * 2)
    return q, k, v, wq, wk, rnd(H)


def assert_state(got: HybridState, want: HybridState, tol=1e-5):
    for name, a, b in zip(["kv", "ksum", "win_k", "win_v", "win_mask"], got.tensors(), want.tensors(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if name.startswith("win"):
            # The window is copied, not computed: exactly equal.
            assert torch.equal(a, b), f"{name} differs"
        elif a.numel():
            assert not torch.isnan(a).any(), f"{name}: NaN (an element was never written)"
            err = rel_rmse(a, b)
            assert err <= tol, f"{name}: relative RMSE {err:.2e} > {tol:.0e}"


@interpreted
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("W", [0, 1, 2, 64])
def test_decode_state_matches_torch(recurrent, monkeypatch, W, masked):
    # Blocks of 32 columns: Dv = 72 spans three programs (the last one partial), each writing its columns of the
    # window's values.
    monkeypatch.setattr(recurrent, "BLOCK_V", 32)
    B, T, H, Hkv, D, F, Dv, steps = 3, 70, 4, 2, 60, 24, 72, 3
    q, k, v, wq, wk, wf = make_inputs(B, T + steps, H, Hkv, D, F, Dv, torch.float32, seed=W + masked)
    mask = None
    if masked:
        # Left padding (sequence 0 padded all through the prefix), and padding tokens among the decoded ones.
        mask = torch.ones(B, T + steps, dtype=torch.bool)
        mask[0, :T] = False
        mask[1, :5] = False
        mask[1, T] = False
        mask[2, T + 2] = False
    args = (wq, wk, wf, W, D**-0.5, 2.0 if W == 64 else None)
    _, state = hybrid_attention_chunked(q[:, :T], k[:, :T], v[:, :T], *args, None if mask is None else mask[:, :T],
                                        None, True)  # fmt: skip
    for t in range(T, T + steps):
        sl = slice(t, t + 1)
        step_mask = None if mask is None else mask[:, sl]  # a [B, 1] view with a batch stride of T + steps
        before = [x.clone() for x in state.tensors()]
        want, want_state = hybrid_attention_chunked(q[:, sl], k[:, sl], v[:, sl], *args, step_mask, state, True)
        got, got_state = recurrent.hybrid_decode_triton(q[:, sl], k[:, sl], v[:, sl], *args, step_mask, state)
        assert not torch.isnan(got).any(), "output: NaN"
        assert rel_rmse(got, want) <= 1e-5, f"output at step {t}"
        assert_state(got_state, want_state)
        for name, a, b in zip(["kv", "ksum", "win_k", "win_v", "win_mask"], state.tensors(), before, strict=True):
            assert torch.equal(a, b), f"{name} of the input state changed"
        if W > 1:
            # The new window lives in new buffers, not in views of the old ones.
            for a, b in zip(got_state.tensors(), state.tensors(), strict=True):
                assert a.data_ptr() != b.data_ptr()
        state = got_state  # the next step starts from the kernel's own (contiguous) state


@interpreted
@pytest.mark.parametrize("W", [0, 2, 8])
def test_decode_from_empty_state_bf16(recurrent, W):
    """No initial state, bf16 inputs: the window holds the new token in the inputs' dtype, bit for bit."""
    B, H, Hkv, D, F, Dv = 2, 4, 1, 32, 16, 32
    q, k, v, wq, wk, wf = make_inputs(B, 1, H, Hkv, D, F, Dv, torch.bfloat16, seed=W)
    args = (wq, wk, wf, W, D**-0.5, None)
    want, want_state = hybrid_attention_chunked(q, k, v, *args, None, None, True)
    got, got_state = recurrent.hybrid_decode_triton(q, k, v, *args)
    assert got.dtype == torch.bfloat16
    assert rel_rmse(got, want) <= 1e-2
    assert_state(got_state, want_state)
