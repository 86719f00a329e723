"""Command-line overrides of the hybrid chunk kernels' tuning knobs, shared by the benchmark scripts.

`--warps name=N,...` sets the warps per program of named kernels (the keys of `triton_chunk.WARPS`), `--stages
name=N,...` their software-pipelining stages (0: Triton's default), `--bq-*` the query rows per program or step
(`triton_chunk.BQ_*`), `--bv-state` the Dv columns per state program, `--phi-chunks` the chunks per feature program,
`--save-states` keeps the forward's features and states for the backward, `--no-overlap` launches every kernel on
one stream, `--no-tma` keeps the window kernel on pointer loads instead of TMA descriptors.
"""

from __future__ import annotations

import argparse
import os

import torch

from linearize.kernels import hybrid
from linearize.kernels.hybrid import triton_chunk

# Which of q, k, v, wq, wk and the window factor ask for a gradient (`--grads`), as `compile_check.GRADS` has them;
# kept here so that a script timing an older package (`compare_revisions.py`) does not need that package to know them.
GRADS = {"all": (0, 1, 2, 3, 4, 5), "transfer": (3, 4, 5), "finetune": (0, 1, 2)}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The problem one forward+backward is timed on: B, T, H, D, F and the window."""
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=32)
    parser.add_argument("--Hkv", type=int, default=None, help="key/value heads, a divisor of H (default: H)")
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--F", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument(
        "--grads",
        choices=sorted(GRADS),
        default="all",
        help="leaves that ask for a gradient: all, the feature maps' weights and the window factor (transfer, as "
        "attention transfer trains them) or q, k, v (finetune, as LoRA fine-tuning does)",
    )


def make_problem(args: argparse.Namespace):
    """Random bf16 q `[B, T, H, D]`, k, v `[B, T, Hkv, D]` and fp32 feature weights and window logits (those
    `--grads` names requiring grad), and an output gradient, on the GPU."""
    dev, dt = "cuda", torch.bfloat16
    B, T, H, D, F = args.B, args.T, args.H, args.D, args.F
    hkv = args.Hkv or H
    if H % hkv:
        raise SystemExit(f"--Hkv must divide --H ({H}), got {hkv}")
    q, k, v = (torch.randn(B, T, n, D, device=dev).to(dt) for n in (H, hkv, hkv))
    wq = torch.randn(H, D, F, device=dev) * D**-0.5
    wk = torch.randn(H, D, F, device=dev) * D**-0.5
    wf = torch.full((H,), -2.197, device=dev)
    grad = torch.randn(B, T, H, D, device=dev, dtype=dt)
    leaves = (q, k, v, wq, wk, wf)
    for i in GRADS[args.grads]:
        leaves[i].requires_grad_()
    return leaves, grad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warps", default="", help="name=N,... overrides of triton_chunk.WARPS")
    parser.add_argument("--bq-out", type=int, default=triton_chunk.BQ_OUT, help="query rows per forward program")
    parser.add_argument(
        "--bq-q", type=int, default=triton_chunk.BQ_Q, help="query rows per program, query side's linear kernel"
    )
    parser.add_argument(
        "--bq-kv-linear", type=int, default=triton_chunk.BQ_KV_LINEAR, help="query rows per key-side step"
    )
    parser.add_argument("--bv-state", type=int, default=triton_chunk.BV_STATE, help="Dv columns per state program")
    parser.add_argument("--phi-chunks", type=int, default=triton_chunk.PHI_CHUNKS, help="chunks per feature program")
    parser.add_argument(
        "--stages", default="", help="name=N,... overrides of triton_chunk.STAGES (0: Triton's default)"
    )
    parser.add_argument(
        "--no-overlap", action="store_true", help="launch every kernel on one stream (triton_chunk.OVERLAP off)"
    )
    parser.add_argument(
        "--no-tma", action="store_true", help="pointer loads in the window kernel (triton_chunk.TMA off)"
    )
    add_save_states_argument(parser)


def add_save_states_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save-states",
        action="store_true",
        help="keep the forward's features and states for the backward (LINEARIZE_SAVE_STATES=1)",
    )


def apply_save_states(args: argparse.Namespace) -> None:
    if args.save_states:
        os.environ[hybrid.SAVE_STATES_ENV] = "1"


def _per_kernel(flag: str, text: str) -> list[tuple[str, int]]:
    """The name=N pairs of a per-kernel option, names checked against `triton_chunk.WARPS`."""
    pairs = []
    for item in filter(None, text.split(",")):
        name, _, n = item.partition("=")
        if name not in triton_chunk.WARPS or not n.isdigit():
            raise SystemExit(f"{flag}: expected name=N with name in {sorted(triton_chunk.WARPS)}, got {item!r}")
        pairs.append((name, int(n)))
    return pairs


def set_stages(name: str, n: int) -> None:
    """Pipelining stages of a named kernel; 0 leaves them to Triton."""
    if n:
        triton_chunk.STAGES[name] = n
    else:
        triton_chunk.STAGES.pop(name, None)


def apply(args: argparse.Namespace) -> str:
    """Set the knobs from parsed arguments; returns a one-line description of the settings in force."""
    for name, n in _per_kernel("--warps", args.warps):
        triton_chunk.WARPS[name] = n
    triton_chunk.BQ_OUT, triton_chunk.BQ_Q = args.bq_out, args.bq_q
    triton_chunk.BQ_KV_LINEAR = args.bq_kv_linear
    triton_chunk.BV_STATE = args.bv_state
    triton_chunk.PHI_CHUNKS = args.phi_chunks
    for name, n in _per_kernel("--stages", args.stages):
        set_stages(name, n)
    apply_save_states(args)
    triton_chunk.OVERLAP = not args.no_overlap
    triton_chunk.TMA = False if args.no_tma else None
    return (
        f"warps {triton_chunk.WARPS}, BQ_OUT {args.bq_out}, BQ_Q {args.bq_q}, BQ_KV_LINEAR {args.bq_kv_linear}, "
        f"BV_STATE {args.bv_state}, PHI_CHUNKS {args.phi_chunks}, stages {triton_chunk.STAGES}, saved states {hybrid.save_states()}, "
        f"overlap {triton_chunk.OVERLAP}, TMA {'off' if args.no_tma else 'where the device has it'}"
    )
