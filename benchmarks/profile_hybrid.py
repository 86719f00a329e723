"""Where the time of the hybrid kernels goes: per-kernel CUDA time of one forward+backward and one decode step.

Runs `torch.profiler` over a few iterations and prints, per kernel, the mean CUDA time per iteration, then the
register count and spills of each Triton kernel as compiled for these shapes. A script, not a test: it needs a
CUDA GPU.

    python benchmarks/profile_hybrid.py [--T 16384] [--B 1] [--window 64] [--warps bwd_kv=4,fwd_out=8] [--bq-kv 16]
    python benchmarks/profile_hybrid.py --fla unnormalized     # fla's chunk_linear_attn on the same q, k, v

`--warps` overrides the warps per program of named kernels (the keys of `triton_chunk.WARPS`) and `--bq-*` the query
rows per program or step (`triton_chunk.BQ_*`), for tuning.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import triton
import tuning
from torch.profiler import ProfilerActivity, profile

from linearize.kernels.hybrid import HybridState, triton_chunk, triton_recurrent
from linearize.kernels.hybrid.triton_chunk import hybrid_attention_triton
from linearize.kernels.hybrid.triton_recurrent import hybrid_decode_triton


def _table(prof, iters: int, title: str) -> None:
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            calls[ev.name] += 1
    total = sum(times.values())
    print(f"\n# {title}: {total / iters / 1e3:.3f} ms of kernels per iteration")
    print("| kernel | ms / iter | launches / iter | share |")
    print("|---|---|---|---|")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {name[:70]} | {t / iters / 1e3:.3f} | {calls[name] / iters:.0f} | {t / total:.0%} |")


def _compiled_stats() -> None:
    print("\n# Triton kernels as compiled: registers per thread, spilled bytes")
    print("| kernel | regs | spills |")
    print("|---|---|---|")
    for mod in (triton_chunk, triton_recurrent):
        for name in dir(mod):
            fn = getattr(mod, name)
            cache = getattr(fn, "device_caches", None)
            if not cache:
                continue
            for dev_cache in cache.values():
                kernels = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for compiled in kernels.values():
                    print(f"| {name} | {getattr(compiled, 'n_regs', '?')} | {getattr(compiled, 'n_spills', '?')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tuning.add_shape_arguments(parser)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--fla",
        choices=["normalized", "unnormalized"],
        help="profile fla's chunk_linear_attn on the same q, k, v instead of our kernels (needs fla-core)",
    )
    tuning.add_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_hybrid.py needs a CUDA GPU")
    settings = tuning.apply(args)
    dev, dt = "cuda", torch.bfloat16
    B, T, H, D, F, W = args.B, args.T, args.H, args.D, args.F, args.window
    (q, k, v, wq, wk, wf), grad = tuning.make_problem(args)

    if args.fla:
        from fla.ops.linear_attn import chunk_linear_attn

        def attend():
            return chunk_linear_attn(q, k, v, normalize=args.fla == "normalized")[0]

        settings = f"fla chunk_linear_attn, {args.fla}"
    else:

        def attend():
            return hybrid_attention_triton(q, k, v, wq, wk, wf, W, D**-0.5)[0]

    def step():
        # Fresh gradients each time, so that no accumulation kernels enter the table.
        for t in (q, k, v, wq, wk, wf):
            t.grad = None
        attend().backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    print(f"# {torch.cuda.get_device_name()}; B={B} T={T} H={H} Hkv={k.shape[2]} D={D} F={F} W={W}, bf16; {settings}")
    _table(prof, args.iters, "forward+backward")
    # Kernels on the side stream overlap others, so their sum can exceed the time the step takes.
    wall = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    print(f"\nforward+backward wall time: {wall:.3f} ms (median of triton.testing.do_bench)")
    if args.fla:
        return

    Bd, Hkv = 16, 8
    qd = torch.randn(Bd, 1, H, D, device=dev, dtype=dt)
    kd, vd = (torch.randn(Bd, 1, Hkv, D, device=dev, dtype=dt) for _ in range(2))
    state = HybridState.zeros(Bd, H, Hkv, D, D, 2 * F, W, dt, torch.device(dev))
    state.win_mask.fill_(True)
    with torch.no_grad():
        for _ in range(3):
            hybrid_decode_triton(qd, kd, vd, wq, wk, wf, W, D**-0.5, None, None, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                hybrid_decode_triton(qd, kd, vd, wq, wk, wf, W, D**-0.5, None, None, state)
            torch.cuda.synchronize()
    _table(prof, 20, f"decode step, B={Bd}, {H} query / {Hkv} KV heads")
    _compiled_stats()


if __name__ == "__main__":
    main()
