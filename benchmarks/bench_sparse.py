"""Prefill time of one attention layer with LoLA's sparse cache against the plain lolcats op.

SmolLM2-135M's layer shape (9 query heads, 3 key/value heads, head size 64, feature dimension 64, window 64), random
inputs, the op alone (no projections): the plain op through the dispatcher (Triton on a GPU, the chunked PyTorch
path elsewhere) and `sparse_hybrid_attention` (PyTorch, a loop over blocks of C tokens) for each cache size K,
forward only, as an evaluation runs it. Median of `--repeats` runs after one warm-up.

    python benchmarks/bench_sparse.py --device cuda --batch 32 --lengths 4096 8192 --caches 64 256
    OMP_NUM_THREADS=1 python benchmarks/bench_sparse.py --batch 1 --lengths 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from linearize.kernels.hybrid import hybrid_attention
from linearize.kernels.hybrid.sparse import sparse_hybrid_attention

HEADS, KV_HEADS, HEAD_DIM, FEATURES, WINDOW = 9, 3, 64, 64, 64


def _seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _rows(T: int, args, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    B = args.batch
    q, k, v = rand(B, T, HEADS, HEAD_DIM), rand(B, T, KV_HEADS, HEAD_DIM), rand(B, T, KV_HEADS, HEAD_DIM)
    wq, wk = (rand(HEADS, HEAD_DIM, FEATURES, scale=0.1).float() for _ in range(2))
    common = (q, k, v, wq, wk, torch.zeros(HEADS, device=device), WINDOW, HEAD_DIM**-0.5)
    with torch.no_grad():
        plain = _seconds(lambda: hybrid_attention(*common), device, args.repeats)
        print(f"| {T} | lolcats | {plain:.3f} |")
        for K in args.caches:
            run = lambda K=K: sparse_hybrid_attention(*common, cache_size=K, block=args.block)  # noqa: E731
            print(f"| {T} | lolcats + sparse cache K={K} | {_seconds(run, device, args.repeats):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--caches", type=int, nargs="+", default=[64])
    parser.add_argument("--block", type=int, default=None, help="C (default: the window)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device {device}, {dtype}, batch {args.batch}, window {WINDOW}, block {args.block or WINDOW}")
    print("| tokens | op | seconds per layer |")
    print("|---|---|---|")
    for T in args.lengths:
        _rows(T, args, device, dtype, gen)


if __name__ == "__main__":
    main()
