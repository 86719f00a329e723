"""Coordinate search over the hybrid chunk kernels' tuning knobs, timing one forward+backward.

For each knob in turn (warps per kernel, pipelining stages, query rows per program or step, Dv columns per state
program, chunks per feature program), every listed value is tried with the other knobs at the best found so far; a
setting that does not compile or run (too much shared memory, say) is reported and skipped. Prints a line per trial
and the best settings as the arguments that `bench_hybrid.py` and `profile_hybrid.py` take. A script, not a test: it
needs a CUDA GPU.

    python benchmarks/tune_hybrid.py [--T 16384] [--B 1] [--window 64] [--rounds 1] [--save-states]
"""

from __future__ import annotations

import argparse

import torch
import triton
import tuning

from linearize.kernels.hybrid import triton_chunk
from linearize.kernels.hybrid.triton_chunk import hybrid_attention_triton

WARP_CHOICES = (4, 8)
# The sequential state passes carry small tiles per program, where fewer warps have paid (docs/BENCHMARKS.md).
STATE_WARP_CHOICES = (1, 2, 4, 8)
STATE_KERNELS = ("fwd_state", "bwd_state")
ROW_CHOICES = (16, 32, 64)
BV_CHOICES = (32, 64, 128)
PHI_CHOICES = (1, 2, 4, 8)
# Pipelining stages matter only for kernels with a loop; 0 is Triton's default.
STAGE_CHOICES = (0, 1, 2)
LOOP_KERNELS = (*STATE_KERNELS, "bwd_kv_linear", "wgrad")


def _knobs() -> list[tuple[str, tuple]]:
    knobs = [(f"warps:{n}", STATE_WARP_CHOICES if n in STATE_KERNELS else WARP_CHOICES) for n in triton_chunk.WARPS]
    knobs += [(f"stages:{name}", STAGE_CHOICES) for name in LOOP_KERNELS]
    knobs += [(name, ROW_CHOICES) for name in ("BQ_OUT", "BQ_Q", "BQ_KV_LINEAR")]
    knobs += [("BV_STATE", BV_CHOICES)]
    knobs += [("PHI_CHUNKS", PHI_CHOICES)]
    return knobs


def _get(knob: str):
    if knob.startswith("warps:"):
        return triton_chunk.WARPS[knob.split(":", 1)[1]]
    if knob.startswith("stages:"):
        return triton_chunk.STAGES.get(knob.split(":", 1)[1], 0)
    return getattr(triton_chunk, knob)


def _set(knob: str, value) -> None:
    if knob.startswith("warps:"):
        triton_chunk.WARPS[knob.split(":", 1)[1]] = value
    elif knob.startswith("stages:"):
        tuning.set_stages(knob.split(":", 1)[1], value)
    else:
        setattr(triton_chunk, knob, value)


def _arguments() -> str:
    warps = ",".join(f"{k}={v}" for k, v in triton_chunk.WARPS.items())
    stages = ",".join(f"{k}={triton_chunk.STAGES.get(k, 0)}" for k in LOOP_KERNELS)
    return (
        f"--warps {warps} --stages {stages} --bq-out {triton_chunk.BQ_OUT} --bq-q {triton_chunk.BQ_Q} "
        f"--bq-kv-linear {triton_chunk.BQ_KV_LINEAR} "
        f"--bv-state {triton_chunk.BV_STATE} --phi-chunks {triton_chunk.PHI_CHUNKS}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tuning.add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=1, help="passes over all knobs")
    tuning.add_save_states_argument(parser)
    args = parser.parse_args()
    tuning.apply_save_states(args)
    if not torch.cuda.is_available():
        raise SystemExit("tune_hybrid.py needs a CUDA GPU")
    B, T, H, D, F, W = args.B, args.T, args.H, args.D, args.F, args.window
    leaves, grad = tuning.make_problem(args)
    q, k, v, wq, wk, wf = leaves

    def step():
        for t in leaves:
            t.grad = None
        hybrid_attention_triton(q, k, v, wq, wk, wf, W, D**-0.5)[0].backward(grad)

    def measure() -> float:
        try:
            step()
            torch.cuda.synchronize()
            return triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
        except (triton.runtime.errors.OutOfResources, triton.CompilationError, RuntimeError) as err:
            print(f"#   failed: {str(err).splitlines()[0][:120]}", flush=True)
            return float("inf")

    shape = f"B={B} T={T} H={H} Hkv={k.shape[2]} D={D} F={F} W={W}"
    print(f"# {torch.cuda.get_device_name()}; {shape}, bf16, fwd+bwd ms", flush=True)
    best = measure()
    print(f"start: {best:.3f} ms with {_arguments()}", flush=True)
    for _ in range(args.rounds):
        for knob, choices in _knobs():
            keep = _get(knob)
            for value in choices:
                if value == keep:
                    continue
                _set(knob, value)
                ms = measure()
                print(f"{knob}={value}: {ms:.3f} ms", flush=True)
                if ms < best:
                    best, keep = ms, value
            _set(knob, keep)
    print(f"best: {best:.3f} ms with {_arguments()}", flush=True)


if __name__ == "__main__":
    main()
