"""The Triton kernels compile for Hopper (sm_90) and fit its shared memory, checked without a GPU: Triton lowers a
kernel to PTX and assembles it with its own ptxas on any machine. This catches what the interpreter tests cannot
(they run a kernel's Python, not its compiled form): type errors of compiled code and kernels whose buffers exceed
the shared memory. The compilations run in a subprocess, because the interpreter tests of this folder may have
switched Triton to its interpreter in this process.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from linearize.kernels import compile_check

# Triton itself is not imported here: the interpreter tests of this folder decide how it is imported.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# Each case merges several features, so that every kernel variant the host code can launch compiles in one case or
# another while each case compiles about ten kernels (about 25 CPU seconds with an empty Triton cache): the dtypes
# bf16, fp32 and fp16 with soft-capping; windows 0, 1, 5 and 16 (pair tiles of the own chunk and of the previous one)
# and 64 (of the previous one only); the window kernel's TMA descriptors (bf16, and fp32 with columns to pad, D = 60 in
# blocks of 64), its pointer loads after a carried window, and its pointer loads on a device without descriptors; the
# backward with every gradient, with those of attention transfer (the feature maps and the window factor) and of LoRA
# fine-tuning (q, k, v: no `_wgrad_kernel`); sequences packed in one row at chunk boundaries (variable-length
# batches), whose state passes restart per sequence, with and without the one-chunk lag of a window.
CASES = [
    # The training step: padding, grouped heads, descriptors; also the loop statistics in bf16.
    pytest.param("--masked --Hkv 2".split(), id="bf16-W64-gqa-padding-descriptors"),
    pytest.param("--window 0 --dtype fp32 --masked --grads transfer".split(), id="fp32-W0-transfer-grads"),
    pytest.param(
        "--window 5 --dtype fp16 --softcap 30 --D 60 --F 24 --state --grads finetune".split(),
        id="fp16-W5-D60-softcap-state-finetune-grads",
    ),
    pytest.param("--window 16 --dtype fp32 --D 60 --F 24 --packed 2".split(), id="fp32-W16-D60-packed-descriptors"),
    pytest.param(
        "--window 1 --packed 3 --state --Hkv 2 --grads transfer --no-tma".split(),
        id="bf16-W1-packed-state-transfer-grads-pointer-loads",
    ),
]


# The compile_check runs of this module: every case, then the loop statistics of the state passes of the first two
# (bf16 and fp32), whose kernels the Triton cache then holds: only the assembler runs again.
STATE_PASSES = "_fwd_state_kernel,_bwd_state_kernel"
LOOP_RUNS = [["--loops", "--kernels", STATE_PASSES, *case.values[0]] for case in CASES[:2]]
RUNS = [["--no-stats", *case.values[0]] for case in CASES] + LOOP_RUNS
# One process runs them all, one after the other (importing torch and Triton once): each run's table or traceback
# and exit status, between markers.
_RUNNER = """
import contextlib, io, json, sys, traceback
from linearize.kernels import compile_check
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = compile_check.main(["--H", "4", "--T", "130", *args])
        except Exception:
            traceback.print_exc(file=out)
            rc = 1
    print(f"=== {json.dumps(args)} rc={rc}\\n{out.getvalue()}", flush=True)
"""


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[int, str]]:
    """`python -m linearize.kernels.compile_check --H 4 --T 130 *args` for each of RUNS: args -> (status, output)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _RUNNER, json.dumps(RUNS)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {}
    for block in result.stdout.split("=== ")[1:]:
        head, _, body = block.partition("\n")
        args, _, rc = head.rpartition(" rc=")
        runs[args] = (int(rc), body)
    assert len(runs) == len(RUNS), result.stdout[-3000:] + result.stderr[-3000:]
    return runs


def _compile_check(compiled, args) -> str:
    """The table compile_check printed for `args` (it must have succeeded)."""
    import json

    rc, out = compiled[json.dumps(args)]
    assert rc == 0, out[-6000:]
    return out


@pytest.mark.parametrize("args", CASES)
def test_kernels_compile_for_sm90(compiled, args):
    stdout = _compile_check(compiled, ["--no-stats", *args])
    # One row per distinct kernel of the forward, the backward and a decoding step.
    names = {line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| _")}
    expected = {"_phi_kernel", "_fwd_state_kernel", "_fwd_out_kernel", "_delta_kernel", "_bwd_state_kernel",
                "_bwd_q_linear_kernel", "_bwd_kv_linear_kernel", "_wgrad_kernel", "_decode_kernel"}  # fmt: skip
    if "--window" not in args or args[args.index("--window") + 1] != "0":
        # The window pairs run as their own kernel where there is a window.
        expected.add("_bwd_q_window_kernel")
    if "finetune" in args:
        # No gradient of the feature maps' weights: no weight-gradient launch.
        expected.remove("_wgrad_kernel")
    assert names == expected, stdout


def test_every_launch_asks_for_fused_multiply_adds():
    # Triton 3.10 turns fused multiply-adds off unless a launch asks for them (3.9 warns): every kernel asks, so the
    # compiled code, its speed and its rounding do not change with the Triton version.
    code = (
        "from linearize.kernels.compile_check import hybrid_launches\n"
        "for args in ({}, {'window': 0, 'with_state': False}):\n"
        "    for launch in hybrid_launches(**args):\n"
        "        print(launch.name, launch.kwargs.get('enable_fp_fusion'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) >= 10 and {name for name, _ in rows} >= {"_phi_kernel", "_bwd_q_window_kernel", "_decode_kernel"}
    assert [name for name, flag in rows if flag != "True"] == []


@pytest.mark.parametrize("version, found", [((3, 3), "found 3.3"), (None, "none installed")])
def test_compile_check_names_the_triton_it_needs(monkeypatch, capsys, version, found):
    monkeypatch.setattr(compile_check, "triton_version", lambda: version)
    assert compile_check.main(["--no-stats"]) == 2
    out = capsys.readouterr().out
    assert f"compile_check needs Triton 3.4 or newer ({found}): pip install 'triton>=3.4,<4'" in out


def test_check_refuses_a_kernel_over_the_shared_memory(monkeypatch):
    def fake_compile(launch, arch, stats, loops=False):
        return compile_check.Compiled(launch.name, compile_check.SM90_SHARED_LIMIT + 1, None, None)

    monkeypatch.setattr(compile_check, "compile_launch", fake_compile)

    def kernel(x, N):  # stands in for a JIT function: only its name and arguments are read
        pass

    kernel.arg_names = ["x", "N"]
    kernel.params = [type("P", (), {"is_constexpr": False})()] * 2
    launch = compile_check.Launch(kernel, (torch.zeros(4), 3), {"num_warps": 4})
    with pytest.raises(RuntimeError, match="kernel needs .* bytes of shared memory"):
        compile_check.check([launch])


def test_check_names_the_kernel_that_does_not_compile(monkeypatch):
    def failing(launch, arch, stats, loops=False):
        raise AssertionError("Loop-carried variable kv changes type")

    monkeypatch.setattr(compile_check, "compile_launch", failing)
    monkeypatch.setattr(compile_check, "_signature", lambda launch: ({}, {}, {}, {}))
    launch = compile_check.Launch(type("K", (), {"__name__": "_some_kernel"})(), (), {})
    with pytest.raises(RuntimeError, match="_some_kernel does not compile for sm_90: AssertionError"):
        compile_check.check([launch])


def _loop_rows(compiled, args):
    rows = {}
    for line in _compile_check(compiled, ["--loops", *args]).splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0] in ("_fwd_state_kernel", "_bwd_state_kernel"):
            rows.setdefault(cells[0], [int(c) for c in cells[6:]])
    return rows


def test_state_loops_sum_on_the_tensor_cores_without_shuffles(compiled):
    # The sequential state passes accumulate the normaliser's key sums (and their gradient) as products with a ones /
    # d(den) block: sums over rows would reduce across lanes (shuffles) and warps in every step of the loop.
    for run in LOOP_RUNS:
        dtype = run[run.index("--dtype") + 1] if "--dtype" in run else "bf16"
        rows = _loop_rows(compiled, run[1:])
        assert set(rows) == {"_fwd_state_kernel", "_bwd_state_kernel"}, rows
        for name, (instructions, products, _, shuffles) in rows.items():
            # The state update and the sums: at least two products per step, no shuffles.
            assert instructions > 0 and products >= 2 and shuffles == 0, (dtype, name, rows[name])


def test_outermost_loop_counts_the_longest_backward_branch():
    sass = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FADD R4, R4, R5 ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
    """
    loop = compile_check.outermost_loop(sass)
    assert loop == compile_check.LoopStats(instructions=6, products=1, barriers=1, shuffles=1)
    assert compile_check.outermost_loop("        /*0000*/                   EXIT ;") is None
