"""Compile the hybrid op's Triton kernels for a GPU architecture on a machine without a GPU, and report what each
compiled kernel uses: shared memory, registers per thread and spilled bytes, and with `--loops` what one step of
its outermost loop executes in machine code (the step of a sequential pass is its latency).

Triton lowers a kernel to PTX and assembles it with the `ptxas` it ships, neither of which needs a device, so a CPU
machine (CI) can check that every kernel compiles for Hopper and fits its shared memory, which the interpreter tests
cannot (the interpreter runs the Python of a kernel, not its compiled form). The kernels are compiled with the
arguments the host code really passes: `record_launches` runs the host functions on CPU tensors with every kernel
replaced by a recorder, so the argument types, the constants and the launch options are those of a GPU run.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from .hybrid import _version_text, triton_version

# Oldest Triton whose compiler API this module drives (3.2 and 3.3 take other arguments; checked up to 3.9).
COMPILE_CHECK_TRITON = (3, 4)
# The largest shared memory one program may use on sm_90 (H100, H200): 227 KB.
SM90_SHARED_LIMIT = 232448

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


@dataclass
class Launch:
    """One kernel launch as the host code made it."""

    fn: object
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__


@dataclass
class LoopStats:
    """The instructions of a kernel's outermost loop in its machine code (SASS): what one step of a sequential pass
    executes. Products are `HGMMA`/`HMMA`, barriers `BAR`, warp shuffles `SHFL`."""

    instructions: int
    products: int
    barriers: int
    shuffles: int


@dataclass
class Compiled:
    name: str
    shared: int
    registers: int | None
    spilled: int | None
    options: dict = field(default_factory=dict)
    loop: LoopStats | None = None


class _Recorder:
    def __init__(self, fn, launches: list[Launch]):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.fn, args, kwargs))

        return launch


@contextlib.contextmanager
def record_launches(*modules, tma: bool = True):
    """Within the block, every Triton kernel referenced by `modules` is recorded instead of launched, and the host
    code takes the compiled path (loop bounds read at run time) and, with `tma`, the TMA descriptors of a device
    that has them (`triton_chunk.TMA`). Yields the list of `Launch`es."""
    import triton

    from .hybrid import triton_chunk

    launches: list[Launch] = []
    saved = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, launches))
    niter, use_tma = triton_chunk._Plan.niter, triton_chunk.TMA
    triton_chunk._Plan.niter = lambda self, n: 0
    triton_chunk.TMA = tma
    try:
        yield launches
    finally:
        triton_chunk._Plan.niter, triton_chunk.TMA = niter, use_tma
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _is_descriptor(value) -> bool:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return isinstance(value, TensorDescriptor)


def _signature(launch: Launch):
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    values = dict(zip(fn.arg_names, launch.args, strict=False))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = values[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif _is_descriptor(value):
            # A host-side TMA descriptor: its element type and block shape are part of the kernel's type.
            signature[name] = f"tensordesc<{_TYPES[value.base.dtype]}[{','.join(map(str, value.block_shape))}]>"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            # Device allocations are 16-byte aligned, which Triton specialises on.
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not supported")
    return signature, constexprs, attrs, options


def _assemble(ptx: str, arch: int, loops: bool = False) -> tuple[int | None, int | None, LoopStats | None]:
    """Registers and spilled bytes from Triton's ptxas, and with `loops` the outermost loop of the machine code."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", cubin], capture_output=True, text=True
        )
        loop = None
        if loops:
            cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
            loop = outermost_loop(sass)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None, loop)


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*(.*)$")


def outermost_loop(sass: str) -> LoopStats | None:
    """Statistics of the longest backward branch's span in `cuobjdump -sass` output (None without a loop)."""
    ops = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2), m.group(4)))
    spans = []
    for addr, op, rest in ops:
        target = re.match(r"`?\(?0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    if not spans:
        return None
    start, end = max(spans, key=lambda span: span[1] - span[0])
    body = [op for addr, op, _ in ops if start <= addr <= end]
    return LoopStats(len(body), sum(op in ("HGMMA", "HMMA") for op in body), body.count("BAR"), body.count("SHFL"))


def compile_launch(launch: Launch, arch: int = 90, stats: bool = True, loops: bool = False) -> Compiled:
    """Compile one recorded launch for `sm_{arch}` (CUDA); raises what Triton raises if it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _signature(launch)
    src = ASTSource(launch.fn, signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spilled, loop = _assemble(kernel.asm["ptx"], arch, loops) if stats or loops else (None, None, None)
    return Compiled(launch.name, kernel.metadata.shared, regs, spilled, options, loop)


# Which of q, k, v, wq, wk and the window factor ask for a gradient (`GRADS`, `--grads`): all of them, the attention's
# own weights as attention transfer trains them, or q, k and v as LoRA fine-tuning does.
GRADS = {"all": (0, 1, 2, 3, 4, 5), "transfer": (3, 4, 5), "finetune": (0, 1, 2)}


def hybrid_launches(B=1, T=256, H=4, Hkv=2, D=128, F=64, window=64, dtype=torch.bfloat16, masked=True,
                    with_state=True, softcap=None, tma=True, grads="all", packed=0) -> list[Launch]:  # fmt: skip
    """The launches of one forward+backward of the chunked hybrid op and of one decoding step, on these sizes (with
    `tma`, as on a device with TMA descriptors), with the gradients `GRADS[grads]` asked for; with `packed` > 0, of
    that many sequences packed in one row at chunk boundaries (`chunk_offsets`: B = 1, T rounded up to whole
    chunks, a padding mask)."""
    from .hybrid import triton_chunk, triton_recurrent
    from .hybrid.torch_chunked import HybridState

    g = torch.Generator().manual_seed(0)
    offsets = None
    if packed:
        if B != 1:
            raise ValueError(f"packed sequences run with batch 1, got --B {B}")
        chunks = -(-T // triton_chunk.BLOCK_T)
        B, T, masked, packed = 1, chunks * triton_chunk.BLOCK_T, True, min(packed, chunks)
        offsets = torch.linspace(0, chunks, packed + 1).round().long()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rnd(B, T, H, D), rnd(B, T, Hkv, D), rnd(B, T, Hkv, D)
    wq, wk = torch.randn(H, D, F, generator=g), torch.randn(H, D, F, generator=g)
    wf = torch.zeros(H)
    leaves = (q, k, v, wq, wk, wf)
    for i in GRADS[grads]:
        leaves[i].requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool) if masked else None
    state = HybridState.zeros(packed or B, H, Hkv, D, D, 2 * F, window, dtype, torch.device("cpu"))
    with record_launches(triton_chunk, triton_recurrent, tma=tma) as launches:
        out, _ = triton_chunk.hybrid_attention_triton(q, k, v, wq, wk, wf, window, D**-0.5, softcap, mask,
                                                      state if with_state else None, output_final_state=True,
                                                      chunk_offsets=offsets)  # fmt: skip
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            step_state = state.index_select(torch.tensor([0])) if packed else state
            triton_recurrent.hybrid_decode_triton(q[:, :1], k[:, :1], v[:, :1], wq, wk, wf, window, D**-0.5, softcap,
                                                  None, step_state)  # fmt: skip
    return launches


def check(launches: list[Launch], arch: int = 90, stats: bool = True, loops: bool = False) -> list[Compiled]:
    """Compile each distinct launch; raises `RuntimeError` naming the kernel if one fails to compile or needs more
    shared memory than `sm_90` has."""
    done, results = set(), []
    for launch in launches:
        signature, constexprs, attrs, options = _signature(launch)
        key = (launch.name, tuple(signature.items()), repr(sorted(constexprs.items())), tuple(options.items()))
        if key in done:
            continue
        done.add(key)
        try:
            compiled = compile_launch(launch, arch, stats, loops)
        except Exception as e:
            raise RuntimeError(f"{launch.name} does not compile for sm_{arch}: {type(e).__name__}: {e}") from e
        if arch == 90 and compiled.shared > SM90_SHARED_LIMIT:
            raise RuntimeError(
                f"{launch.name} needs {compiled.shared} bytes of shared memory, more than the {SM90_SHARED_LIMIT} of "
                f"sm_90 (options {options}): use fewer pipelining stages or smaller blocks"
            )
        results.append(compiled)
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m linearize.kernels.compile_check",
        description="Compile the hybrid kernels for a CUDA architecture without a GPU and print their resources.",
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 for H100/H200")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--H", type=int, default=32)
    parser.add_argument("--Hkv", type=int, default=None, help="key/value heads (default: --H)")
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--F", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--masked", action="store_true", help="with a padding mask")
    parser.add_argument("--state", action="store_true", help="with an initial state (a carried window)")
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--grads", choices=sorted(GRADS), default="all",
                        help="the gradients the backward computes: all, the feature maps' and the window factor's "
                        "(transfer) or those of q, k, v (finetune)")  # fmt: skip
    parser.add_argument("--packed", type=int, default=0, metavar="N",
                        help="N sequences packed in one row at chunk boundaries (variable-length batches)")  # fmt: skip
    parser.add_argument("--no-stats", action="store_true", help="skip the registers and spills (faster)")
    parser.add_argument("--kernels", default=None, metavar="NAME,...",
                        help="compile only the kernels of these names (default: all of them)")  # fmt: skip
    parser.add_argument(
        "--no-tma", action="store_true", help="the pointer loads a device without TMA descriptors runs (below sm_90)"
    )
    parser.add_argument(
        "--loops",
        action="store_true",
        help="also count the instructions, products, barriers and shuffles of each kernel's outermost loop",
    )
    args = parser.parse_args(argv)
    version = triton_version()
    if version is None or version < COMPILE_CHECK_TRITON:
        need = _version_text(COMPILE_CHECK_TRITON)
        found = "none installed" if version is None else "found " + _version_text(version)
        print(f"error: compile_check needs Triton {need} or newer ({found}): pip install 'triton>={need},<4'")
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set, so there are no compiled kernels: unset it and run again")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.Hkv = args.Hkv or args.H
    try:
        launches = hybrid_launches(args.B, args.T, args.H, args.Hkv, args.D, args.F, args.window, dtype, args.masked,
                                   args.state, args.softcap, tma=args.arch >= 90 and not args.no_tma,
                                   grads=args.grads, packed=args.packed)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}")
        return 2
    if args.kernels:
        names = set(args.kernels.split(","))
        unknown = names - {launch.name for launch in launches}
        if unknown:
            print(f"error: no launch of {', '.join(sorted(unknown))} with these arguments")
            return 2
        launches = [launch for launch in launches if launch.name in names]
    try:
        results = check(launches, args.arch, not args.no_stats, args.loops)
    except RuntimeError as e:
        print(f"error: {e}")
        return 1
    import triton

    print(f"# sm_{args.arch}, triton {triton.__version__}; B={args.B} T={args.T} H={args.H} Hkv={args.Hkv} D={args.D} "
          f"F={args.F} W={args.window} {args.dtype}, gradients: {args.grads}"
          + (f", {args.packed} packed sequences" if args.packed else ""))  # fmt: skip
    loop_head = " loop instructions | products | barriers | shuffles |" if args.loops else ""
    print("| kernel | warps | stages | shared bytes | registers | spill stores (bytes) |" + loop_head)
    print("|---" * (6 + 4 * args.loops) + "|")
    for c in results:
        stages = c.options.get("num_stages", "default")
        row = f"| {c.name} | {c.options.get('num_warps')} | {stages} | {c.shared} | {c.registers} | {c.spilled} |"
        if args.loops:
            lp = c.loop
            row += (
                " - | - | - | - |"
                if lp is None
                else f" {lp.instructions} | {lp.products} | {lp.barriers} | {lp.shuffles} |"
            )
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
