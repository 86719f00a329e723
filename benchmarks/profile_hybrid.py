"""Where the time of the hybrid kernels goes: per-kernel CUDA time of one forward+backward and one decode step.

Runs `torch.profiler` over a few iterations and prints, per kernel, the mean CUDA time per iteration with the
bytes the kernel moves (each tensor it reads or writes counted once: `kernel_bytes`, `fla_kernel_bytes`) and the
rate that makes, then the device's copy rate and the register count and spills of each Triton kernel as compiled
for these shapes. A script, not a test: it needs a CUDA GPU.

    python benchmarks/profile_hybrid.py [--T 16384] [--B 1] [--window 64] [--warps bwd_q_window=8] [--bq-kv-linear 32]
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

from linearize.kernels.hybrid import HybridState, save_states, triton_chunk, triton_recurrent
from linearize.kernels.hybrid.triton_chunk import hybrid_attention_triton
from linearize.kernels.hybrid.triton_recurrent import hybrid_decode_triton


def kernel_bytes(B, T, H, Hkv, D, F, W, saved: bool, elt: int = 2) -> dict[str, int]:
    """Bytes each of our kernels (summed over its launches in one forward+backward) reads and writes in device
    memory, counting every tensor it touches once: rows that several programs read (the previous chunk's keys, a
    key/value head shared by a GQA group) are taken as cache hits. `saved` is `LINEARIZE_SAVE_STATES=1`."""
    n, nt = B * T, -(-T // 64)
    q, k, v, o = n * H * D * elt, n * Hkv * D * elt, n * Hkv * D * elt, n * H * D * elt
    phi = n * H * 2 * F * elt
    states = B * H * nt * 2 * F * D * elt + B * H * nt * 2 * F * 4
    row = n * H * 4  # one fp32 per query row: den, d(den)
    pre = n * H * F * elt  # feature-map pre-activation gradients
    per_head = n * H * 2 * D * elt  # the key side's dk, dv per query head
    part = n * H * D * elt  # one of the window kernel's dk, dv parts per query head
    lag = 1 if W >= 2 else 0
    own = 1 if W < 64 else 0  # pairs within the chunk on the linear side
    # With a window, the window kernel's [rows, keys] tiles of the pairs with the own and the previous key chunk,
    # which the linear kernels read instead of the values; without one the key side reads den and d(den) too.
    tiles = n * H * 64 * elt * (own + lag) if W else 0
    handed = part * (1 + lag + (1 - own)) if W else 2 * row
    passes = 1 if saved else 2  # the forward's features and state pass, recomputed by the default backward
    out = {
        "_phi_kernel": passes * (q + k + 2 * phi),
        "_fwd_state_kernel": passes * (phi + v + states),
        "_fwd_out_kernel": q + k + v + 2 * phi + states + o + row,
        "_delta_kernel": 2 * o + o + 2 * row,
        "_bwd_state_kernel": phi + o + row + states,
        # With a window, the window's dq is written by one query-side kernel and read back by the other.
        "_bwd_q_linear_kernel": (tiles if W else v) + 2 * phi + states + o + row + (2 if W else 1) * q + pre,
        # The window's dk (own and previous chunk) and dv (when W >= 64) per query head are written by the query
        # side's window kernel and read back by the key side.
        "_bwd_kv_linear_kernel": 2 * phi + v + states + o + handed + tiles + per_head + pre,
        "_wgrad_kernel": q + k + 2 * pre,
    }
    if W:
        out["_bwd_q_window_kernel"] = q + k + v + o + row + q + part * (1 + lag + (1 - own)) + tiles
    if H != Hkv:
        out["group sums"] = per_head + k + v
    return out


def fla_kernel_bytes(B, T, H, D, elt: int = 2) -> dict[str, int]:
    """The same count for fla's `chunk_linear_attn(normalize=False)` (fla-core 0.6.0: per-chunk states and their
    gradients in the input type, states recomputed by the backward), by kernel name."""
    x = B * T * H * D * elt  # q, k, v, o and their gradients
    states = B * H * -(-T // 64) * D * D * elt
    return {
        "chunk_fwd_kernel_h": 2 * (2 * x + states),
        "chunk_fwd_kernel_o": 4 * x + states,
        "chunk_bwd_kernel_dh": 2 * x + states,
        "chunk_bwd_kernel_dqkwg": 6 * x + 2 * states,
        "chunk_bwd_kernel_dv": 4 * x + states,
    }


def copy_rate() -> float:
    """Device-memory copy rate in bytes per second: a 1 GiB copy (read and write) timed by `do_bench`."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def _table(prof, iters: int, title: str, nbytes: dict[str, int] | None = None) -> None:
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name
            if nbytes:
                if "reduce_kernel" in name and "ReduceOp<float" not in name and "group sums" in nbytes:
                    name = "group sums"
                name = next((key for key in nbytes if key in name), name)
            times[name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            calls[name] += 1
    total = sum(times.values())
    print(f"\n# {title}: {total / iters / 1e3:.3f} ms of kernels per iteration")
    if nbytes:
        print("| kernel | ms / iter | launches / iter | share | MB (each tensor once) | TB/s |")
        print("|---|---|---|---|---|---|")
    else:
        print("| kernel | ms / iter | launches / iter | share |")
        print("|---|---|---|---|")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:15]:
        cells = f"| {name[:70]} | {t / iters / 1e3:.3f} | {calls[name] / iters:.0f} | {t / total:.0%} |"
        if nbytes:
            mb = nbytes.get(name)
            cells += f" {mb / 1e6:.0f} | {mb / (t / iters * 1e-6) / 1e12:.2f} |" if mb else " - | - |"
        print(cells)
    if nbytes:
        moved = sum(nbytes.values())
        print(
            f"\nbytes moved (each tensor once per kernel): {moved / 1e9:.2f} GB, {moved / (total / iters * 1e-6) / 1e12:.2f} TB/s over the kernels' time"
        )


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


def peak_bytes(step, leaves) -> int:
    """Device memory `step()` (one forward+backward) allocates at its peak, above what is allocated before it with
    the leaves' gradients cleared."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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
    Hkv = k.shape[2]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; B={B} T={T} H={H} "
          f"Hkv={Hkv} D={D} F={F} W={W}, bf16, gradients: {args.grads}; {settings}")  # fmt: skip
    if args.fla:
        nbytes = fla_kernel_bytes(B, T, H, D) if args.fla == "unnormalized" and Hkv == H else None
    else:
        # The byte counts are those of the full backward.
        nbytes = kernel_bytes(B, T, H, Hkv, D, F, W, save_states()) if args.grads == "all" else None
    _table(prof, args.iters, "forward+backward", nbytes)
    # Kernels on the side stream overlap others, so their sum can exceed the time the step takes.
    wall = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    print(f"\nforward+backward wall time: {wall:.3f} ms (median of triton.testing.do_bench)")
    rate = copy_rate()
    print(f"device-memory copy rate: {rate / 1e12:.2f} TB/s (a 1 GiB copy)")
    if nbytes:
        print(f"those bytes at the copy rate: {sum(nbytes.values()) / rate * 1e3:.3f} ms")
    print(
        f"peak memory of one forward+backward above what its inputs hold: {peak_bytes(step, (q, k, v, wq, wk, wf)) / 1e9:.2f} GB"
    )
    if args.fla:
        return

    Bd, Hd = 16, 8
    qd = torch.randn(Bd, 1, H, D, device=dev, dtype=dt)
    kd, vd = (torch.randn(Bd, 1, Hd, D, device=dev, dtype=dt) for _ in range(2))
    state = HybridState.zeros(Bd, H, Hd, D, D, 2 * F, W, dt, torch.device(dev))
    state.win_mask.fill_(True)
    with torch.no_grad():
        for _ in range(3):
            hybrid_decode_triton(qd, kd, vd, wq, wk, wf, W, D**-0.5, None, None, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                hybrid_decode_triton(qd, kd, vd, wq, wk, wf, W, D**-0.5, None, None, state)
            torch.cuda.synchronize()
    _table(prof, 20, f"decode step, B={Bd}, {H} query / {Hd} KV heads")
    _compiled_stats()


if __name__ == "__main__":
    main()
