"""Triton kernels of the hybrid op against the ground truth: outputs, final states and every gradient.

On CPU the kernels run under the Triton interpreter (fp32, small shapes). Triton reads `TRITON_INTERPRET` when a
kernel is decorated, so the fixture sets it and re-imports the kernel modules, and restores compiled kernels after
each test. The GPU tests (skipped without CUDA) use bf16 at large shapes with the flash-attention rule: the kernel's
error against the fp32 reference is at most twice that of the naive op computed in bf16 on the same inputs.
"""

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Triton decides when it is imported whether its own library runs under the interpreter; on a CPU-only
    # machine this module wants it to.
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from linearize.errors import LinearizeError  # noqa: E402
from linearize.kernels import hybrid  # noqa: E402
from linearize.kernels.hybrid import (  # noqa: E402
    HybridState,
    hybrid_attention,
    hybrid_attention_chunked,
    hybrid_attention_naive,
    kernel_name,
)

INTERPRETED = type(triton.language.standard.zeros).__name__ == "InterpretedFunction"
# In import order: the kernel modules before the host module that imports their kernels.
MODULES = tuple(
    f"linearize.kernels.hybrid.{name}"
    for name in ("triton_common", "triton_chunk_fwd", "triton_chunk_bwd", "triton_chunk", "triton_recurrent")
)
# Where triton was imported compiled (a GPU machine, or another test module first), the interpreter tests run in a
# fresh process instead: see test_interpreter_tests_in_subprocess.
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in a subprocess under TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU and compiled Triton kernels"
)


def _nan_empty(*shape, dtype=torch.float32, device=None):
    # Integer buffers get a value no kernel writes there (no valid position or index is that negative).
    if dtype == torch.bool:
        fill = True
    else:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    # Re-import the kernels in case an earlier test imported them before TRITON_INTERPRET was set.
    for mod in (importlib.reload(importlib.import_module(name)) for name in MODULES):
        # Poison every kernel-written buffer, so an element a kernel forgets to write fails the comparison.
        if hasattr(mod, "_empty"):
            monkeypatch.setattr(mod, "_empty", _nan_empty)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests run in this process")
def test_interpreter_tests_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not gpu"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def rel_rmse(actual, expected, atol=0.0):
    """RMSE of the difference over (RMS of `expected` + `atol`)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / (expected.pow(2).mean().sqrt() + atol).clamp_min(1e-12)).item()


def assert_rel(actual, expected, tol, what, atol=0.0):
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element was never written)"
    err = rel_rmse(actual, expected, atol)
    assert err <= tol, f"{what}: relative RMSE {err:.2e} > {tol:.0e}"


def make_inputs(B, T, H, Hkv, D, F, Dv=None, dtype=torch.float32, device="cpu", seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    q, k, v = rnd(B, T, H, D), rnd(B, T, Hkv, D), rnd(B, T, Hkv, Dv)
    wq, wk = rnd(H, D, F, s=D**-0.5 * 2).float(), rnd(H, D, F, s=D**-0.5 * 2).float()
    wf = rnd(H).float()
    mask = None
    if pad:
        # Left padding of different lengths per sequence.
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        for b in range(B):
            mask[b, : pad * (b + 1) // B] = False
    return [q, k, v, wq, wk, wf], mask


def grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout, allow_unused=True)


# Each case at the smallest size that reaches its code: one token; a sequence shorter than a chunk (W < 64: the pair
# tile of the own chunk); one past a chunk (W = 64: the previous chunk's pairs, D = 60 padded to its block, Dv = 68 in
# two state programs); left padding of different lengths per sequence (B = 2) with grouped heads; soft-capping; a
# window of one token; several chunks (the sequential state passes). Several feature programs run in
# test_feature_program_chunks_match_naive.
CASES = [
    pytest.param(1, 1, 2, 2, 32, 16, 0, 0, None, id="B1-T1-H2-D32-W0"),
    pytest.param(1, 1, 2, 2, 32, 16, 4, 0, None, id="B1-T1-H2-D32-W4"),
    pytest.param(1, 63, 2, 2, 32, 16, 16, 0, None, id="B1-T63-H2-D32-W16"),
    pytest.param(2, 65, 2, 1, 60, 24, 64, 0, None, id="B2-T65-H2-Hkv1-D60-F24-W64"),
    pytest.param(2, 63, 2, 1, 60, 16, 8, 20, None, id="B2-T63-H2-Hkv1-D60-W8-leftpad"),
    pytest.param(2, 65, 2, 2, 32, 16, 0, 30, None, id="B2-T65-H2-D32-W0-leftpad"),
    pytest.param(1, 100, 2, 2, 32, 16, 2, 0, 5.0, id="B1-T100-H2-D32-W2-softcap"),
    pytest.param(1, 70, 2, 2, 32, 16, 1, 0, None, id="B1-T70-H2-D32-W1"),
    pytest.param(1, 200, 2, 1, 32, 16, 64, 0, None, id="B1-T200-H2-Hkv1-D32-W64"),
]


@interpreted
@pytest.mark.parametrize("B,T,H,Hkv,D,F,W,pad,softcap", CASES)
def test_chunk_matches_naive(interpreter, B, T, H, Hkv, D, F, W, pad, softcap):
    torch.manual_seed(0)
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, Dv=D + 8, pad=pad, seed=T + W)
    for t in leaves:
        t.requires_grad_()
    out, _ = hybrid_attention(*leaves, W, D**-0.5, softcap, mask)
    dout = torch.randn_like(out)
    assert_matches_naive(out, grads(out, leaves, dout), leaves, mask, dout, W, D**-0.5, softcap)


def assert_matches_naive(out, got, leaves, mask, dout, W, scale, softcap):
    """The output and the six gradients `got` (of q, k, v, wq, wk, window factor for `dout`) against the naive op in
    float64 on the same inputs."""
    T = out.shape[1]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = hybrid_attention_naive(*ref_leaves, W, scale, softcap, mask)
    want = grads(ref, ref_leaves, dout.double())
    assert_rel(out, ref, 1e-5, "output")
    for name, a, b in zip(["dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"], got, want, strict=True):
        if W == 0 and name == "dwindow_factor":
            assert a is None or not a.any()
            continue
        # With one token the output is v up to eps whatever q, k and the weights: their gradients are ~eps and
        # only absolutely small.
        atol = 1.0 if T == 1 and name != "dv" else 0.0
        assert_rel(a, b, 1e-4, name, atol)


@interpreted
@pytest.mark.parametrize(
    "bq,B,T,H,Hkv,D,F,W,pad,softcap",
    [
        pytest.param(16, 1, 130, 2, 1, 32, 16, 64, 20, None, id="BQ16-B1-T130-H2-Hkv1-W64-leftpad"),
        pytest.param(32, 1, 100, 2, 2, 32, 16, 5, 0, 5.0, id="BQ32-B1-T100-H2-W5-softcap"),
    ],
)
def test_row_blocks_match_naive(interpreter, monkeypatch, bq, B, T, H, Hkv, D, F, W, pad, softcap):
    # The query rows per program (forward output, query side's linear kernel) and per key-side step are tuning
    # knobs: any divisor of the chunk must give the same op.
    mod = importlib.import_module("linearize.kernels.hybrid.triton_chunk")
    for name in ("BQ_OUT", "BQ_Q", "BQ_KV_LINEAR"):
        monkeypatch.setattr(mod, name, bq)
    test_chunk_matches_naive(interpreter, B, T, H, Hkv, D, F, W, pad, softcap)


@interpreted
@pytest.mark.parametrize(
    "B,T,H,Hkv,D,F,W,pad,softcap",
    [
        # W < 64: the pair tiles of the own chunk and of the previous one; T < one chunk; soft-capping.
        pytest.param(1, 63, 2, 2, 32, 16, 16, 0, 5.0, id="B1-T63-H2-D32-W16-softcap"),
        # Columns past D = 60 padded by the descriptors, rows past T = 130 left out of stores, one pair tile.
        pytest.param(1, 130, 2, 1, 60, 24, 64, 20, None, id="B1-T130-H2-Hkv1-D60-F24-W64-leftpad"),
    ],
)
def test_window_descriptors_match_pointer_loads(interpreter, monkeypatch, B, T, H, Hkv, D, F, W, pad, softcap):
    # The query side's window kernel reads and writes through TMA descriptors on a device that has them: the same
    # op as its pointer loads, to the bit, and against the naive op (columns past D = 60 padded by the descriptors,
    # rows past T left out of their stores).
    mod = importlib.import_module("linearize.kernels.hybrid.triton_chunk")
    made = []
    block_descriptor = mod._block_descriptor
    monkeypatch.setattr(mod, "_block_descriptor", lambda t, cols: made.append(cols) or block_descriptor(t, cols))
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, Dv=D + 8, pad=pad, seed=T + W)
    dout = torch.randn(B, T, H, D + 8, generator=torch.Generator().manual_seed(1))
    # q, k, dq, dk, dk_next in blocks of D columns, v, dn, dv of Dv (each rounded up to a power of two), and the pair
    # tiles of one chunk's keys: of the own chunk when W < 64, of the previous one (W >= 2 here).
    bd, bv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(D + 8))
    expected = sorted([bd] * 5 + [bv] * 3 + [64] * (1 + (W < 64)))
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(mod, "TMA", tma)
        made.clear()
        xs = [t.clone().requires_grad_() for t in leaves]
        out, _ = hybrid_attention(*xs, W, D**-0.5, softcap, mask)
        results[tma] = [out, *grads(out, xs, dout)]
        assert sorted(made) == (expected if tma else [])
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for name, a, b in zip(names, results[True], results[False], strict=True):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name
    # And against the naive op.
    assert_matches_naive(results[True][0], results[True][1:], leaves, mask, dout, W, D**-0.5, softcap)


def test_window_descriptors_only_where_the_device_and_tensors_allow(monkeypatch):
    from linearize.kernels.hybrid import triton_chunk

    monkeypatch.setattr(triton_chunk, "TMA", None)
    assert not triton_chunk._tma_device(torch.device("cpu"))
    monkeypatch.setattr(triton_chunk, "TMA", True)
    assert triton_chunk._tma_device(torch.device("cpu"))
    monkeypatch.setattr(triton_chunk, "TMA", False)
    assert not triton_chunk._tma_device(torch.device("cpu"))
    x = torch.zeros(2, 64, 4, 128, dtype=torch.bfloat16)
    assert triton_chunk._addressable(x, x[:, 1:].contiguous())
    # A base 2 bytes past an aligned one (rows of 120 bf16, 240 bytes, would do); rows of 60 bf16 (120 bytes, not a
    # multiple of 16); a strided last dim.
    shifted = x.view(-1)[1 : 1 + 2 * 64 * 4 * 120].view(2, 64, 4, 120)
    assert triton_chunk._addressable(x.view(-1)[: 2 * 64 * 4 * 120].view(2, 64, 4, 120))
    assert not triton_chunk._addressable(shifted)
    assert not triton_chunk._addressable(torch.zeros(2, 64, 4, 60, dtype=torch.bfloat16))
    assert not triton_chunk._addressable(x[..., ::2])


@interpreted
def test_feature_program_chunks_match_naive(interpreter, monkeypatch, chunks=3):
    # The chunks per feature program are a tuning knob: any number gives the same op, also where the last program
    # holds fewer chunks than the others or the sequence is shorter than one program's chunks.
    mod = importlib.import_module("linearize.kernels.hybrid.triton_chunk")
    monkeypatch.setattr(mod, "PHI_CHUNKS", chunks)
    test_chunk_matches_naive(interpreter, 1, 200, 2, 1, 32, 16, 64, 20, None)
    test_two_calls_equal_one(interpreter, 16, 40, 30)


@interpreted
def test_state_blocks_match_naive(interpreter, monkeypatch, bv=16, F=24, T=90, D=32, W=64, pad=20):
    # The Dv columns per program of the state passes are a tuning knob: every block gives the same op (here Dv = 40
    # in three programs, the last one partial; the default block of 64 with Dv = 68 runs in test_chunk_matches_naive).
    mod = importlib.import_module("linearize.kernels.hybrid.triton_chunk")
    monkeypatch.setattr(mod, "BV_STATE", bv)
    test_chunk_matches_naive(interpreter, 1, T, 2, 1, D, F, W, pad, None)
    # A carried state in and a final state out (the state pass's initial and final loads and stores).
    test_two_calls_equal_one(interpreter, 64, 70, 3, F=F)


def _low_precision_errors(dtype, device, B, T, H, Hkv, D, F, W, pad):
    """Errors of the Triton kernels and of the naive op computed in `dtype` (every product and softmax in the input
    type, as a 16-bit model computes it) on the same 16-bit inputs, both against the fp32 naive op."""
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, dtype=dtype, device=device, pad=pad, seed=1)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    for t in leaves:
        t.requires_grad_()
    scale = D**-0.5
    ref = hybrid_attention_naive(*ref_leaves, W, scale, None, mask)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device)
    want = [ref, *grads(ref, ref_leaves, dout)]
    os.environ["LINEARIZE_KERNELS"] = "triton"
    try:
        out, _ = hybrid_attention(*leaves, W, scale, None, mask)
    finally:
        os.environ.pop("LINEARIZE_KERNELS")
    low = hybrid_attention_naive(*leaves, W, scale, None, mask, upcast=False)
    got = {
        "triton": [out, *grads(out, leaves, dout.to(out.dtype))],
        "naive": [low, *grads(low, leaves, dout.to(low.dtype))],
    }
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    result = {}
    for i, name in enumerate(names):
        if W == 0 and name == "dwindow_factor":
            continue
        assert not torch.isnan(got["triton"][i]).any(), f"{name}: NaN"
        result[name] = tuple(rel_rmse(got[p][i].float(), want[i]) for p in ("triton", "naive"))
    return result


def assert_within_twice_naive(errors, dtype, slack=0.0):
    # Flash-attention's rule: the kernel's error at most twice that of the same-precision PyTorch op, plus a small
    # absolute term where given.
    for name, (kernel, naive) in errors.items():
        assert kernel <= 2 * naive + slack, f"{name}: kernel {kernel:.2e} vs naive {dtype} {naive:.2e}"


@interpreted
@pytest.mark.parametrize(
    "B,T,H,Hkv,D,F,W",
    [
        pytest.param(1, 130, 2, 1, 64, 32, 64, id="B1-T130-H2-Hkv1-D64-F32-W64"),
        pytest.param(1, 100, 2, 2, 32, 16, 0, id="B1-T100-H2-D32-F16-W0"),
        pytest.param(1, 90, 2, 1, 60, 24, 16, id="B1-T90-H2-Hkv1-D60-F24-W16"),
    ],
)
def test_chunk_fp16_within_twice_naive_fp16_error(interpreter, B, T, H, Hkv, D, F, W):
    # The 16-bit code path (operands in the input type, states stored in it) under the interpreter, which emulates
    # fp16 but not bf16. The naive fp16 op overflows on rows without keys, so there is no padding here; the GPU
    # test below covers padding in bf16.
    # The slack of one unit of fp16 resolution: at these sizes the per-head window factor's gradient has two to four
    # elements, and on some draws of the inputs its error exceeds twice the naive one although both are a few units.
    errors = _low_precision_errors(torch.float16, "cpu", B, T, H, Hkv, D, F, W, 0)
    assert_within_twice_naive(errors, torch.float16, slack=torch.finfo(torch.float16).eps)


def _count_calls(monkeypatch, name):
    """A list that gets one item per call of the host function `name` of `triton_chunk`."""
    mod = importlib.import_module("linearize.kernels.hybrid.triton_chunk")
    fn, calls = getattr(mod, name), []
    monkeypatch.setattr(mod, name, lambda *a: calls.append(1) or fn(*a))
    return calls


def _after_carried_window(B, T, H, D, W, seed):
    """Inputs of 2T tokens (H / 2 key/value heads, F = 16, Dv = 24, left padding) and the state after their first
    T."""
    leaves, mask = make_inputs(B, 2 * T, H, H // 2, D, 16, Dv=24, pad=5, seed=seed)
    q, k, v, wq, wk, wf = leaves
    with torch.no_grad():
        _, state = hybrid_attention(q[:, :T], k[:, :T], v[:, :T], wq, wk, wf, W, D**-0.5, None, mask[:, :T], None,
                                    True)  # fmt: skip
    return leaves, mask, state


@interpreted
@pytest.mark.parametrize("W", [0, 64])
def test_saved_states_give_the_same_gradients(interpreter, monkeypatch, W):
    # LINEARIZE_SAVE_STATES=1 keeps the forward's features and per-chunk states for the backward instead of
    # recomputing them: the same kernels on the same inputs, so the same gradients to the bit (here after a carried
    # window, whose keys' features are kept too), with no feature launch in the backward.
    B, T, H, D = 1, 70, 2, 32
    (q, k, v, wq, wk, wf), mask, state = _after_carried_window(B, T, H, D, W, seed=3)
    calls = _count_calls(monkeypatch, "_features")
    dout = torch.randn(B, T, H, 24, generator=torch.Generator().manual_seed(1))
    results, backward_calls = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LINEARIZE_SAVE_STATES", flag)
        xs = [t[:, T:].clone().requires_grad_() for t in (q, k, v)] + [t.clone().requires_grad_() for t in (wq, wk, wf)]
        out, _ = hybrid_attention(*xs, W, D**-0.5, None, mask[:, T:], state)
        calls.clear()
        results[flag] = [out, *grads(out, xs, dout)]
        backward_calls[flag] = len(calls)
    # Queries and keys (one launch), and the carried window's keys where there is a window to carry.
    assert backward_calls == {"0": 2 if W > 1 else 1, "1": 0}
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for name, a, b in zip(names, results["0"], results["1"], strict=True):
        if a is None or b is None:
            assert W == 0 and name == "dwindow_factor"
            continue
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name


# Which leaves ask for a gradient: attention transfer trains the feature maps and the window factor on frozen q, k, v;
# LoRA fine-tuning trains q, k, v with the attention's own weights frozen.
PARTIAL = {
    "transfer": (3, 4, 5),
    "finetune": (0, 1, 2),
    "window_factor": (5,),
    "q_and_wk": (0, 4),
}


@interpreted
@pytest.mark.parametrize("W,saved", [(0, "1"), (8, "0"), (64, "1")])
def test_partial_gradients_equal_the_full_ones(interpreter, monkeypatch, W, saved):
    # With only some leaves asking for a gradient the backward skips the products and launches the others need; what
    # it does compute takes the same operations, so it equals the full backward's to the bit. After a carried window,
    # with padding and grouped heads; the four subsets of PARTIAL are the four combinations of the backward's flags
    # (q, k or v; wq or wk; the window factor) that training asks for.
    monkeypatch.setenv("LINEARIZE_SAVE_STATES", saved)
    B, T, H, D = 1, 70, 2, 32
    (q, k, v, wq, wk, wf), mask, state = _after_carried_window(B, T, H, D, W, seed=4)
    wgrad_calls = _count_calls(monkeypatch, "_weight_grads")
    dout = torch.randn(B, T, H, 24, generator=torch.Generator().manual_seed(2))

    def run(asked):
        xs = [t[:, T:].clone() for t in (q, k, v)] + [t.clone() for t in (wq, wk, wf)]
        for i in asked:
            xs[i].requires_grad_()
        out, _ = hybrid_attention(*xs, W, D**-0.5, None, mask[:, T:], state)
        wgrad_calls.clear()
        got = grads(out, [xs[i] for i in asked], dout)
        return out, dict(zip(asked, got, strict=True)), len(wgrad_calls)

    names = ["dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    full_out, full, launches = run(range(6))
    assert launches == 1
    for case, asked in PARTIAL.items():
        if W == 0 and asked == (5,):
            continue  # without a window the factor is unused
        out, part, launches = run(asked)
        assert torch.equal(out, full_out), case
        # The weight-gradient products run only for a gradient of wq or wk.
        assert launches == (3 in asked or 4 in asked), case
        for i, g in part.items():
            if W == 0 and i == 5:
                assert g is None or not g.any()
                continue
            assert not torch.isnan(g).any(), f"{case}: {names[i]} NaN (an element was never written)"
            assert torch.equal(g, full[i]), f"{case}: {names[i]} differs from the full backward's"


def test_save_states_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("LINEARIZE_SAVE_STATES", "maybe")
    with pytest.raises(LinearizeError, match="LINEARIZE_SAVE_STATES='maybe' is not 0 or 1"):
        hybrid.save_states()
    monkeypatch.setenv("LINEARIZE_SAVE_STATES", "1")
    assert hybrid.save_states()


@pytest.mark.parametrize("env", ["0", "1"])
def test_keeping_states_overrides_the_environment_inside_its_block(monkeypatch, env):
    monkeypatch.setenv("LINEARIZE_SAVE_STATES", env)
    with hybrid.keeping_states():
        assert hybrid.save_states()
        with hybrid.keeping_states(False):
            assert not hybrid.save_states()
        assert hybrid.save_states()
    assert hybrid.save_states() == (env == "1")


@interpreted
@pytest.mark.parametrize(
    "W,T1,T2",
    [
        pytest.param(0, 70, 30, id="W0-T70+30"),
        pytest.param(16, 40, 30, id="W16-T40+30"),
        pytest.param(64, 10, 90, id="W64-T10+90"),
        pytest.param(64, 70, 3, id="W64-T70+3"),
        pytest.param(2, 65, 64, id="W2-T65+64"),
    ],
)
def test_two_calls_equal_one(interpreter, W, T1, T2, F=16):
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 2, 1, 32
    leaves, mask = make_inputs(B, T1 + T2, H, Hkv, D, F, Dv=24, pad=12, seed=W)
    q, k, v, wq, wk, wf = leaves
    args = (wq, wk, wf, W, D**-0.5, None)
    full_ref, state_ref = hybrid_attention_chunked(q, k, v, *args, mask, None, True)
    first, state = hybrid_attention(q[:, :T1], k[:, :T1], v[:, :T1], *args, mask[:, :T1], None, True)
    q2, k2, v2 = (t[:, T1:].clone().requires_grad_() for t in (q, k, v))
    wq.requires_grad_(), wf.requires_grad_()
    second, final = hybrid_attention(q2, k2, v2, *args, mask[:, T1:], state, True)
    assert_rel(torch.cat([first, second], 1), full_ref, 1e-5, "output")
    for name, a, b in zip(["kv", "ksum", "win_k", "win_v"], final.tensors()[:4], state_ref.tensors()[:4], strict=True):
        assert a.shape == b.shape, name
        if a.numel():
            assert_rel(a, b, 1e-5, name)
    assert torch.equal(final.win_mask, state_ref.win_mask)

    # The second call's gradients equal those of one naive call whose first-part outputs get no gradient
    # (the carried state depends on wk, so dwk is left out).
    dout = torch.randn_like(second)
    got = grads(second, [q2, k2, v2, wq, wf], dout)
    qf, kf, vf = (torch.cat([a[:, :T1].detach(), b], 1) for a, b in zip((q, k, v), (q2, k2, v2), strict=True))
    ref = hybrid_attention_naive(qf, kf, vf, wq, wk, wf, W, D**-0.5, None, mask)[:, T1:]
    want = grads(ref, [q2, k2, v2, wq, wf], dout)
    for name, a, b in zip(["dq", "dk", "dv", "dwq", "dwindow_factor"], got, want, strict=True):
        if W == 0 and name == "dwindow_factor":
            continue
        assert_rel(a, b, 1e-4, name)


@interpreted
@pytest.mark.parametrize(
    "W,softcap,masked",
    [
        pytest.param(0, None, False, id="W0"),
        pytest.param(1, None, True, id="W1-masked"),
        pytest.param(8, 3.0, True, id="W8-softcap-masked"),
        pytest.param(64, None, False, id="W64"),
    ],
)
def test_decode_step_matches_torch(interpreter, W, softcap, masked):
    B, T, H, Hkv, D, F, Dv = 3, 20, 4, 2, 60, 24, 40
    leaves, mask = make_inputs(B, T + 1, H, Hkv, D, F, Dv=Dv, pad=6, seed=W)
    q, k, v, wq, wk, wf = leaves
    if masked:
        mask[1, -1] = False
    args = (wq, wk, wf, W, D**-0.5, softcap)
    _, state = hybrid_attention_chunked(q[:, :T], k[:, :T], v[:, :T], *args, mask[:, :T], None, True)
    for init in (state, None):
        step_mask = mask[:, T:] if init is not None else None
        want, want_state = hybrid_attention_chunked(q[:, T:], k[:, T:], v[:, T:], *args, step_mask, init, True)
        with torch.no_grad():
            got, got_state = hybrid_attention(q[:, T:], k[:, T:], v[:, T:], *args, step_mask, init, True)
        assert_rel(got, want, 1e-5, "output")
        for name, a, b in zip(
            ["kv", "ksum", "win_k", "win_v", "win_mask"], got_state.tensors(), want_state.tensors(), strict=True
        ):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if a.numel():
                assert_rel(a.float(), b.float(), 1e-5, name)


@interpreted
def test_chunk_rejects_long_window(interpreter):
    leaves, _ = make_inputs(1, 8, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="window 0 or 1..64"):
        hybrid_attention(*leaves, 65, 0.25)


def test_dispatch_names(monkeypatch):
    q = torch.zeros(1, 1, 1, 1)
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    assert kernel_name(q, 64) == "torch"
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    assert kernel_name(q, 64) == "torch"
    monkeypatch.setattr(hybrid, "triton_version", lambda: (3, 6))
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    assert kernel_name(q, 64) == "triton"
    monkeypatch.setenv("LINEARIZE_KERNELS", "cuda")
    with pytest.raises(LinearizeError, match=r"\['auto', 'torch', 'triton'\]"):
        hybrid_attention(q, q, q, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), None, 0, 1.0)
    assert hybrid.hybrid_attention_chunked is hybrid_attention_chunked


def test_dispatch_on_cuda_needs_a_triton_the_kernels_run_on(monkeypatch, caplog):
    # Under Triton 3.0 and 3.1 (which torch 2.4 and 2.5 ship) the kernels leave outputs unwritten: `auto` takes the
    # PyTorch path with a warning, and a forced `triton` stops with what to install.
    on_cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    hybrid._warn_old_triton.cache_clear()  # it warns once per version
    for version, window, want in (((3, 2), 64, "triton"), ((4, 0), 64, "triton"), ((3, 9), 65, "torch"),
                                  (None, 64, "torch"), ((3, 1), 64, "torch")):  # fmt: skip
        monkeypatch.setattr(hybrid, "triton_version", lambda v=version: v)
        assert kernel_name(on_cuda, window) == want, (version, window)
    assert "Triton 3.1 is older than 3.2" in caplog.text and "pip install 'triton>=3.2,<4'" in caplog.text
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    with pytest.raises(LinearizeError, match=r"needs Triton >= 3.2, found 3.1: pip install 'triton>=3.2,<4'"):
        kernel_name(on_cuda, 64)
    monkeypatch.setattr(hybrid, "triton_version", lambda: None)
    with pytest.raises(LinearizeError, match=r"Triton is not installed: pip install 'linearize\[gpu\]'"):
        kernel_name(on_cuda, 64)


def test_triton_version_reads_the_installed_one():
    hybrid.triton_version.cache_clear()
    assert hybrid.triton_version() == tuple(int(x) for x in triton.__version__.split(".")[:2])


@cuda
@pytest.mark.parametrize(
    "B,T,H,Hkv,D,F,W,pad",
    [
        pytest.param(2, 1000, 8, 2, 128, 64, 64, 100, id="B2-T1000-H8-Hkv2-D128-F64-W64-leftpad"),
        pytest.param(2, 1000, 8, 8, 128, 64, 0, 0, id="B2-T1000-H8-D128-F64-W0"),
        pytest.param(1, 2048, 4, 4, 60, 64, 32, 0, id="B1-T2048-H4-D60-F64-W32"),
    ],
)
def test_gpu_bf16_within_twice_naive_bf16_error(B, T, H, Hkv, D, F, W, pad):
    assert_within_twice_naive(_low_precision_errors(torch.bfloat16, "cuda", B, T, H, Hkv, D, F, W, pad), torch.bfloat16)


@cuda
def test_gpu_prefill_then_decode():
    B, T, H, Hkv, D, F, W = 2, 300, 8, 2, 128, 64, 64
    leaves, mask = make_inputs(B, T + 2, H, Hkv, D, F, device="cuda", pad=7)
    q, k, v, wq, wk, wf = leaves
    args = (wq, wk, wf, W, D**-0.5, None)
    want, want_state = hybrid_attention_chunked(q, k, v, *args, mask, None, True)
    with torch.no_grad():
        out, state = hybrid_attention(q[:, :T], k[:, :T], v[:, :T], *args, mask[:, :T], None, True)
        outs = [out]
        for t in range(T, T + 2):
            sl = slice(t, t + 1)
            out, state = hybrid_attention(q[:, sl], k[:, sl], v[:, sl], *args, mask[:, sl], state, True)
            outs.append(out)
    assert_rel(torch.cat(outs, 1), want, 1e-4, "output")
    for name, a, b in zip(
        ["kv", "ksum", "win_k", "win_v", "win_mask"], state.tensors(), want_state.tensors(), strict=True
    ):
        assert_rel(a.float(), b.float(), 1e-4, name)


@cuda
@pytest.mark.parametrize("saved", ["0", "1"])
def test_gpu_overlap_gives_the_same_result(monkeypatch, saved):
    # On CUDA the default backward runs the state-gradient pass on a second stream beside the kernels that do not
    # need it. A missing wait would let a kernel read a buffer before it is written; with every kernel on one stream
    # the results must be the same to the bit (with saved states, where everything stays on one stream, too).
    from linearize.kernels.hybrid import triton_chunk

    monkeypatch.setenv("LINEARIZE_SAVE_STATES", saved)
    B, T, H, Hkv, D, F, W = 1, 8192, 8, 2, 128, 64, 64
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, dtype=torch.bfloat16, device="cuda", pad=3, seed=5)
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
    results = {}
    for overlap in (False, True):
        monkeypatch.setattr(triton_chunk, "OVERLAP", overlap)
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out, _ = hybrid_attention(*xs, W, D**-0.5, None, mask)
        results[overlap] = [out, *grads(out, xs, dout)]
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for name, a, b in zip(names, results[False], results[True], strict=True):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a, b), name


@cuda
@pytest.mark.parametrize("W", [64, 16, 0])
def test_gpu_partial_gradients_match_the_full_ones(W):
    # The compiled kernels with only some gradients asked for (the flags change the code Triton compiles) against
    # the full backward, at a large shape in bf16, with padding and grouped heads.
    B, T, H, Hkv, D, F = 1, 8192, 8, 2, 128, 64
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, dtype=torch.bfloat16, device="cuda", pad=3, seed=6)
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)

    def run(asked):
        xs = [t.detach().clone() for t in leaves]
        for i in asked:
            xs[i].requires_grad_()
        out, _ = hybrid_attention(*xs, W, D**-0.5, None, mask)
        return dict(zip(asked, grads(out, [xs[i] for i in asked], dout), strict=True))

    full = run(range(6))
    names = ["dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for case, asked in PARTIAL.items():
        if W == 0 and asked == (5,):
            continue  # without a window the factor is unused
        for i, g in run(asked).items():
            if W == 0 and i == 5:
                continue
            assert_rel(g.float(), full[i].float(), 1e-3, f"{case}: {names[i]}")


@interpreted
@pytest.mark.parametrize("kind", ["lolcats"])
def test_model_runs_packed_sequences_in_one_triton_row(interpreter, monkeypatch, kind):
    # A converted model given packed sequences (transformers' flash-attention kwargs, as DataCollatorWithFlattening
    # makes them) hands them to the dispatcher, which runs them on the Triton kernels in one row at chunk boundaries:
    # the same logits as separate forwards. `hedgehog` is the same module with W = 0, whose packed kernels
    # test_varlen_triton_matches_separate_calls runs.
    from tiny_models import packed_forwards, randomise_new_parameters, tiny_model

    from linearize import AttentionConfig, convert
    from linearize.kernels.hybrid import triton_chunk, varlen

    rows, plans = [], []
    segments, plan = triton_chunk._segments, varlen._plan_layout
    monkeypatch.setattr(triton_chunk, "_segments", lambda *a: rows.append(a[0].numel() - 1) or segments(*a))
    monkeypatch.setattr(varlen, "_plan_layout", lambda *a: plans.append(a[0]) or plan(*a))
    model = tiny_model("llama")
    convert(model, AttentionConfig(kind=kind, window=8, feature_dim=8))
    randomise_new_parameters(model)
    lens = [5, 70, 17]
    # Each sequence on its own on the PyTorch path (the unpacked Triton calls are tested above), then the packed row.
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    _, separate, _ = packed_forwards(model, lens)
    rows.clear(), plans.clear()
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    packed, _, _ = packed_forwards(model, lens, separate=False)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)
    # One Triton call per layer took all three sequences.
    assert rows == [len(lens)] * model.config.num_hidden_layers
    # Every layer got the same offsets: the layout was planned (and moved to the device) once.
    assert len(plans) == 1 and plans[0].tolist() == [0, 5, 75, 92]


def _varlen_layouts_against_fp32(monkeypatch, W, lens, H, Hkv, D, F, dtype, device):
    """A packed batch in one row at chunk boundaries against the padded batch, both in `dtype` on the Triton
    kernels, each against the fp32 PyTorch path: outputs, every gradient and the final states, with carried states.
    The aligned layout's error is at most twice the padded one's."""
    from linearize.kernels.hybrid import varlen

    leaves, _ = make_inputs(1, sum(lens), H, Hkv, D, F, device=device, seed=7)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    history, _ = make_inputs(len(lens), 90, H, Hkv, D, F, device=device, seed=8)
    init = hybrid_attention_chunked(*history[:3], *leaves[3:], W, D**-0.5, None, None, None, True)[1]
    dout = torch.randn(1, sum(lens), H, D, generator=torch.Generator().manual_seed(4)).to(device)
    trained = range(6) if W else range(5)

    def run(dt, kernels, aligned):
        monkeypatch.setenv("LINEARIZE_KERNELS", kernels)
        monkeypatch.setattr(varlen, "ALIGNED", aligned)
        xs = [t.detach().clone() for t in leaves]
        xs = [t.to(dt).requires_grad_(i in trained) if i < 3 else t.requires_grad_(i in trained) for i, t in
              enumerate(xs)]  # fmt: skip
        out, final = hybrid_attention(*xs, W, D**-0.5, None, None, init, True, cu_seqlens=cu)
        return [out, *grads(out, [xs[i] for i in trained], dout.to(dt)), final.kv, final.ksum, final.win_k]

    want = run(torch.float32, "torch", False)
    padded = run(dtype, "triton", False)
    aligned = run(dtype, "triton", True)
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"][: 1 + len(trained)] + ["kv", "ksum", "win_k"]
    for name, w, p, a in zip(names, want, padded, aligned, strict=True):
        if not w.numel():
            continue
        assert not torch.isnan(a).any(), name
        err_p, err_a = rel_rmse(p, w), rel_rmse(a, w)
        assert err_a <= 2 * err_p + 1e-4, f"{name}: aligned {err_a:.2e} against padded {err_p:.2e}"


@interpreted
def test_varlen_aligned_fp16_as_accurate_as_padded(interpreter, monkeypatch):
    _varlen_layouts_against_fp32(monkeypatch, 16, [70, 3, 40], 2, 1, 32, 16, torch.float16, "cpu")


@cuda
@pytest.mark.parametrize("W", [64, 16, 0])
def test_gpu_varlen_aligned_as_accurate_as_padded(monkeypatch, W):
    _varlen_layouts_against_fp32(monkeypatch, W, [700, 3, 2048, 130, 64, 1500, 1, 300], 8, 2, 128, 64,
                                 torch.bfloat16, "cuda")  # fmt: skip


@cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs TMA (sm_90 or newer)"
)
@pytest.mark.parametrize(
    "dtype,D,W",
    [
        pytest.param(torch.bfloat16, 128, 64, id="bf16-D128-W64"),
        pytest.param(torch.float32, 60, 16, id="fp32-D60-W16"),
    ],
)
def test_gpu_window_descriptors_match_pointer_loads(monkeypatch, dtype, D, W):
    # On Hopper the window kernel takes TMA descriptors by default: the same results as its pointer loads, and the
    # descriptors really made (rows past T, here 1000, left out of their stores; columns past D = 60 read as zeros).
    from linearize.kernels.hybrid import triton_chunk

    made = []
    block_descriptor = triton_chunk._block_descriptor
    monkeypatch.setattr(
        triton_chunk, "_block_descriptor", lambda t, cols: made.append(cols) or block_descriptor(t, cols)
    )
    B, T, H, Hkv, F = 2, 1000, 8, 2, 64
    leaves, mask = make_inputs(B, T, H, Hkv, D, F, dtype=dtype, device="cuda", pad=3, seed=5)
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
    results = {}
    for tma in (False, None):
        monkeypatch.setattr(triton_chunk, "TMA", tma)
        made.clear()
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out, _ = hybrid_attention(*xs, W, D**-0.5, None, mask)
        results[tma] = [out, *grads(out, xs, dout)]
        # q, k, v, dn, dq, dk, dv, dk_next and the pair tiles: of the previous key chunk, and of the own one if W < 64.
        assert len(made) == ((9 + (W < 64)) if tma is None else 0)
    names = ["output", "dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for name, a, b in zip(names, results[None], results[False], strict=True):
        assert not torch.isnan(a).any(), name
        assert_rel(a.float(), b.float(), 1e-6, name)


def _varlen_against_separate_calls(lens, W, with_state, Hkv=2, partial=False, masked=False):
    """Packed call with cu_seqlens against one call per sequence: outputs, final states, every gradient; with
    `partial`, also the gradients of attention transfer alone (wq, wk, window factor) against the full backward's;
    with `masked`, a padding mask over a fifth of the tokens. Two query heads: grouped with `Hkv` = 1."""
    H, D, F, Dv = 2, 32, 16, 24
    total = sum(lens)
    leaves, _ = make_inputs(1, total, H, Hkv, D, F, Dv=Dv, seed=len(lens) + W)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    mask = torch.rand(1, total, generator=torch.Generator().manual_seed(9)) > 0.2 if masked else None
    args = (W, D**-0.5, None)
    states = []
    if with_state:
        # Each sequence continues a different history, some shorter than the window.
        for i in range(len(lens)):
            hist, hmask = make_inputs(1, 3 + 40 * i, H, Hkv, D, F, Dv=Dv, seed=100 + i)
            states.append(hybrid_attention_chunked(*hist[:3], *leaves[3:], *args, None, None, True)[1])
        init = HybridState(*(torch.cat(ts, 0) for ts in zip(*(s.tensors() for s in states), strict=True)))
    else:
        init = None
    # The window factor takes a gradient only with a window.
    trained = leaves if W > 0 else leaves[:5]
    for t in trained:
        t.requires_grad_()
    q, k, v, wq, wk, wf = leaves
    out, final = hybrid_attention(*leaves, *args, mask, init, True, cu_seqlens=cu)
    dout = torch.randn_like(out)
    got = grads(out, trained, dout)
    outs, finals = [], []
    for i in range(len(lens)):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        o, f = hybrid_attention_chunked(q[:, sl], k[:, sl], v[:, sl], wq, wk, wf, *args,
                                        mask[:, sl] if masked else None, states[i] if with_state else None,
                                        True)  # fmt: skip
        outs.append(o)
        finals.append(f)
    ref = torch.cat(outs, 1)
    want = grads(ref, trained, dout)
    assert_rel(out, ref, 1e-5, "output")
    names = ["dq", "dk", "dv", "dwq", "dwk", "dwindow_factor"]
    for name, a, b in zip(names, got, want, strict=False):
        assert_rel(a, b, 1e-4, name)
    for i, f in enumerate(finals):
        for name, a, b in zip(["kv", "ksum", "win_k", "win_v"], final.index_select(torch.tensor([i])).tensors(),
                              f.tensors(), strict=False):  # fmt: skip
            assert a.shape == b.shape, name
            if a.numel():
                assert_rel(a.float(), b.float(), 1e-5, f"{name}[{i}]")
        assert torch.equal(final.win_mask[i], f.win_mask[0])
    if partial:
        frozen = [t.detach() for t in leaves[:3]]
        out2, _ = hybrid_attention(*frozen, *leaves[3:], *args, mask, init, False, cu_seqlens=cu)
        for name, a, b in zip(names[3:], grads(out2, trained[3:], dout), got[3:], strict=False):
            assert torch.equal(a, b), f"transfer: {name}"


VARLEN = [
    pytest.param((5, 70, 1, 33), 16, False, id="lens5-70-1-33-W16"),
    pytest.param((64, 65, 130), 64, True, id="lens64-65-130-W64-state"),
    pytest.param((40, 3), 0, True, id="lens40-3-W0-state"),
    pytest.param((7, 0, 20), 16, True, id="lens7-0-20-W16-state"),
    pytest.param((100, 0, 7, 200, 3), 8, True, id="lens100-0-7-200-3-W8-state"),
    pytest.param((70, 130, 5), 1, True, id="lens70-130-5-W1-state"),
    pytest.param((200, 64, 129), 0, False, id="lens200-64-129-W0"),
]


@pytest.fixture
def varlen_layout(request, monkeypatch):
    """How a packed batch is laid out: "aligned" (one row, sequences at chunk boundaries: the Triton path's
    default), "padded" (one padded batch) or "grouped" (padded groups of similar length; every call costing nothing
    beyond its tokens, so that sequences of different padded lengths go to separate calls). Returns the lists that
    the planned calls' sequence counts and the aligned calls' sequence counts are appended to."""
    from linearize.kernels.hybrid import triton_chunk, varlen

    layout = request.param
    monkeypatch.setattr(varlen, "ALIGNED", layout == "aligned")
    monkeypatch.setattr(varlen, "GROUPED", layout == "grouped")
    if layout == "grouped":
        monkeypatch.setattr(varlen, "GROUP_OVERHEAD_TOKENS", 0)
    calls, aligned = [], []
    plan, segments = varlen.plan_groups, triton_chunk._segments
    monkeypatch.setattr(varlen, "plan_groups", lambda *a: calls.extend(g.numel() for g in plan(*a)) or plan(*a))
    monkeypatch.setattr(triton_chunk, "_segments", lambda *a: aligned.append(a[0].numel() - 1) or segments(*a))
    return SimpleNamespace(layout=layout, calls=calls, aligned=aligned)


# On the Triton kernels, the row layout (the default, with its own kernel code) on the cases that reach distinct code:
# sequences of one token and within one chunk, without a carried state (the case that catches the packed-row slips
# of docs/BENCHMARKS.md, with the transfer-mode backward too); W = 0, 1 and 16 with carried states, one sequence of
# zero length; W = 64 with grouped heads and kept states, and a padding mask, in the tests below. The padded and
# grouped layouts, whose planning test_varlen_torch_matches_separate_calls covers on every case, once each on the
# Triton kernels: a left-padded batch with carried windows and a row of padding only, and two padded calls.
TRITON_VARLEN = [
    pytest.param("aligned", (5, 70, 1, 33), 16, False, id="aligned-lens5-70-1-33-W16"),
    pytest.param("aligned", (40, 3), 0, True, id="aligned-lens40-3-W0-state"),
    pytest.param("aligned", (70, 5), 1, True, id="aligned-lens70-5-W1-state"),
    pytest.param("aligned", (7, 0, 20), 16, True, id="aligned-lens7-0-20-W16-state"),
    pytest.param("padded", (7, 0, 20), 16, True, id="padded-lens7-0-20-W16-state"),
    pytest.param("grouped", (5, 70), 16, True, id="grouped-lens5-70-W16-state"),
]


@interpreted
@pytest.mark.parametrize("varlen_layout,lens,W,with_state", TRITON_VARLEN, indirect=["varlen_layout"])
def test_varlen_triton_matches_separate_calls(interpreter, varlen_layout, lens, W, with_state):
    partial = lens == (5, 70, 1, 33)
    _varlen_against_separate_calls(lens, W, with_state, partial=partial)
    _check_layout(varlen_layout, lens, W, with_state, partial)


@interpreted
@pytest.mark.parametrize("varlen_layout", ["aligned"], indirect=True)
def test_varlen_triton_with_a_padding_mask(interpreter, varlen_layout):
    # The padded layout merges the mask into its padding on the host: test_varlen_torch_with_a_padding_mask.
    _varlen_against_separate_calls((40, 7, 70), 16, True, masked=True)
    _check_layout(varlen_layout, (40, 7, 70), 16, True)


@interpreted
@pytest.mark.parametrize("varlen_layout", ["aligned"], indirect=True)
def test_varlen_aligned_with_gqa_and_kept_states(interpreter, varlen_layout):
    # W = 64 with carried windows, a sequence of exactly two chunks with its carried window; the per-chunk states
    # kept from the forward (the recomputed ones run in the cases above), with the transfer-mode backward.
    with hybrid.keeping_states(True):
        _varlen_against_separate_calls((65, 2), 64, True, Hkv=1, partial=True)
    assert varlen_layout.aligned == [2, 2]


@pytest.mark.parametrize("varlen_layout", ["padded", "grouped"], indirect=True)
@pytest.mark.parametrize("lens,W,with_state", VARLEN)
def test_varlen_torch_matches_separate_calls(monkeypatch, varlen_layout, lens, W, with_state):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    _varlen_against_separate_calls(lens, W, with_state)
    _check_layout(varlen_layout, lens, W, with_state)


@pytest.mark.parametrize("varlen_layout", ["padded", "grouped"], indirect=True)
def test_varlen_torch_with_a_padding_mask(monkeypatch, varlen_layout):
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    _varlen_against_separate_calls((90, 7, 150), 16, True, masked=True)
    _check_layout(varlen_layout, (90, 7, 150), 16, True)


def _check_layout(varlen_layout, lens, W, with_state, partial=False):
    # Aligned, one Triton call takes all sequences (twice with the transfer-mode check) and no plan is made.
    # Grouped, one padded call per run of equal padded length (64 tokens per chunk, the carried window counted in);
    # otherwise no plan is made and one call takes all sequences.
    carried = max(W - 1, 0) if with_state else 0
    runs = len({-(-max(n + carried, 1) // 64) for n in lens})
    if varlen_layout.layout == "grouped":
        assert len(varlen_layout.calls) == runs, varlen_layout.calls
        assert sum(varlen_layout.calls) == len(lens)
    else:
        assert varlen_layout.calls == []
    assert varlen_layout.aligned == ([len(lens)] * (1 + partial) if varlen_layout.layout == "aligned" else [])


@interpreted
@pytest.mark.parametrize(
    "B,T,offsets,match",
    [
        pytest.param(2, 64, [0, 1], "batch 1", id="batch"),
        pytest.param(1, 100, [0, 1], "multiple of 64", id="length"),
        pytest.param(1, 128, [0, 1, 2], "initial_state holds 1 sequences", id="state"),
    ],
)
def test_chunk_offsets_reject_bad_layouts(interpreter, B, T, offsets, match):
    from linearize.kernels.hybrid.triton_chunk import hybrid_attention_triton

    leaves, _ = make_inputs(B, T, 2, 2, 16, 8)
    state = hybrid_attention_chunked(*make_inputs(1, 5, 2, 2, 16, 8)[0], 4, 0.25, None, None, None, True)[1]
    with pytest.raises(ValueError, match=match):
        hybrid_attention_triton(*leaves, 4, 0.25, initial_state=state if match.startswith("initial") else None,
                                chunk_offsets=torch.tensor(offsets))  # fmt: skip


def test_varlen_layout_planned_once_per_offsets_tensor(monkeypatch):
    from linearize.kernels.hybrid import varlen

    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    plans = []
    plan = varlen._plan_layout
    monkeypatch.setattr(varlen, "_plan_layout", lambda *a: plans.append(a[0].tolist()) or plan(*a))
    leaves, _ = make_inputs(1, 30, 2, 2, 16, 8, seed=3)
    cu = torch.tensor([0, 10, 30])
    first, _ = hybrid_attention(*leaves, 4, 0.25, cu_seqlens=cu)
    again, _ = hybrid_attention(*leaves, 4, 0.25, cu_seqlens=cu)
    assert plans == [[0, 10, 30]] and torch.equal(first, again)
    # Other settings, an equal but distinct tensor, and the tensor changed in place each plan anew.
    hybrid_attention(*leaves, 8, 0.25, cu_seqlens=cu)
    copy = cu.clone()
    hybrid_attention(*leaves, 4, 0.25, cu_seqlens=copy)
    copy[1] = 20
    moved, _ = hybrid_attention(*leaves, 4, 0.25, cu_seqlens=copy)
    assert plans == [[0, 10, 30]] * 3 + [[0, 20, 30]]
    assert not torch.equal(moved, first)
    copy[1] = 40
    with pytest.raises(ValueError, match="not decrease"):
        hybrid_attention(*leaves, 4, 0.25, cu_seqlens=copy)
    # A freed tensor's layout is not reused by a new one at the same address.
    del copy
    hybrid_attention(*leaves, 4, 0.25, cu_seqlens=torch.tensor([0, 20, 30]))
    assert plans[-1] == [0, 20, 30] and len(plans) == 6
    assert len(varlen._LAYOUTS) <= varlen.LAYOUT_CACHE


def test_plan_groups_pads_less_than_one_call():
    from linearize.kernels.hybrid.varlen import plan_groups

    lens = torch.tensor([3000, 120, 2900, 100, 80, 900, 64, 1000, 50])
    groups = plan_groups(lens, overhead=2048)
    # Longest first; every sequence once.
    assert [g.tolist() for g in groups] == [[0, 2], [7, 5], [1, 3, 4, 6, 8]]
    padded = sum(len(g) * -(-int(lens[g].max()) // 64) * 64 for g in groups)
    assert padded + 2048 * len(groups) < len(lens) * 3008
    # Equal padded lengths never split; a large overhead keeps one call.
    assert [g.tolist() for g in plan_groups(torch.tensor([5, 60, 1]), overhead=0)] == [[0, 1, 2]]
    assert len(plan_groups(lens, overhead=10**9)) == 1
    assert plan_groups(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize(
    "cu,match",
    [
        pytest.param([0, 5, 9], "end at the packed length 10", id="short"),
        pytest.param([1, 10], "start at 0", id="start"),
        pytest.param([0, 6, 4, 10], "not decrease", id="decreasing"),
    ],
)
def test_varlen_rejects_bad_offsets(cu, match):
    leaves, _ = make_inputs(1, 10, 2, 2, 16, 8)
    with pytest.raises(ValueError, match=match):
        hybrid_attention(*leaves, 4, 0.25, cu_seqlens=torch.tensor(cu))


def test_varlen_rejects_a_batch():
    leaves, _ = make_inputs(2, 10, 2, 2, 16, 8)
    with pytest.raises(ValueError, match="packed along T with batch size 1, got batch 2"):
        hybrid_attention(*leaves, 4, 0.25, cu_seqlens=torch.tensor([0, 10]))
