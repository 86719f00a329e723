"""Forward+backward time of the hybrid kernels on packed variable-length batches (`cu_seqlens`), by how the
sequences are laid out: in one row at chunk boundaries (`varlen.ALIGNED`, the default), as one left-padded batch,
as the grouped padded calls `plan_groups` picks (`varlen.GROUPED`), and, as the floor, the same number of tokens as
one unbroken sequence.

Document lengths are drawn from a log-normal distribution (seeded), packed into rows of `--tokens` tokens as a
flattening data collator would; H = 32, D = 128, F = 64, W = 64, bf16; ms, median of `triton.testing.do_bench`.
A script, not a test: it needs a CUDA GPU.

    python benchmarks/bench_varlen.py [--tokens 16384] [--median-length 600] [--sigma 1.0] [--grads all]
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch
import triton
from bench_hybrid import HEAD_DIM, HEADS, WINDOW, _fwd_bwd, _inputs
from tuning import GRADS

from linearize.kernels.hybrid import hybrid_attention, varlen


def document_lengths(tokens: int, median: float, sigma: float, seed: int = 0) -> list[int]:
    """Log-normal lengths (at least 1) whose sum is `tokens`, the last one cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < tokens:
        n = max(1, int(math.exp(math.log(median) + sigma * torch.randn(1, generator=gen).item())))
        lens.append(min(n, tokens - sum(lens)))
    return lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--median-length", type=float, default=600.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the document lengths")
    parser.add_argument("--grads", choices=sorted(GRADS), default="all", help="the leaves that ask for a gradient")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_varlen.py needs a CUDA GPU")
    lens = document_lengths(args.tokens, args.median_length, args.sigma)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    leaves = _inputs(1, args.tokens, HEADS, HEADS, HEAD_DIM)
    asked = [leaves[i] for i in GRADS[args.grads]]
    scale = HEAD_DIM**-0.5

    def packed(*x):
        return hybrid_attention(*x, WINDOW, scale, cu_seqlens=cu)[0]

    def unbroken(*x):
        return hybrid_attention(*x, WINDOW, scale)[0]

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# {len(lens)} documents in {args.tokens} tokens (median {sorted(lens)[len(lens) // 2]}, longest "
          f"{max(lens)}), H={HEADS}, D={HEAD_DIM}, W={WINDOW}, bf16, gradients: {args.grads}")  # fmt: skip
    groups = varlen.plan_groups(torch.tensor(lens))
    step = varlen.CHUNK

    def whole(n):
        return -(-n // step) * step

    aligned = sum(whole(n) for n in lens)
    one = len(lens) * whole(max(lens))
    grouped = sum(len(g) * whole(max(lens[i] for i in g.tolist())) for g in groups)
    print("| layout | calls | tokens with padding | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|")
    defaults = varlen.ALIGNED, varlen.GROUPED
    try:
        for name, aligning, grouping, run, calls, tokens in (
            ("one row at chunk boundaries (ALIGNED)", True, False, packed, 1, aligned),
            ("one padded batch", False, False, packed, 1, one),
            ("padded groups (GROUPED)", False, True, packed, len(groups), grouped),
            ("one unbroken sequence", True, False, unbroken, 1, args.tokens),
        ):
            varlen.ALIGNED, varlen.GROUPED = aligning, grouping
            fwd, both = _fwd_bwd(partial(run, *leaves), asked)
            print(f"| {name} | {calls} | {tokens} | {fwd:.3f} | {both:.3f} |", flush=True)
    finally:
        varlen.ALIGNED, varlen.GROUPED = defaults


if __name__ == "__main__":
    main()
