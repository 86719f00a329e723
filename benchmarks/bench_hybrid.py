"""Speed of the hybrid-attention Triton kernels against SDPA (flash) and, when installed, fla's chunk_linear_attn.

Prints three tables: forward and forward+backward times at B*T = 16k tokens (H=32, D=128, F=64, bf16) for our
hedgehog (W=0) and hybrid (W=64) kernels; the forward's achieved bandwidth against the 3.0 TB/s copy floor
(bytes of q, k, v read and o written once); and decode-step latency against context length (B=16, 32 query heads,
8 KV heads), launched eagerly and replayed from a CUDA graph. `fla` is chunk_linear_attn with its normaliser (the
op ours computes: outputs divided by q . the sum of keys), `fla_unnorm` the same call with normalize=False (its
chunked kernels alone, without the normaliser fla adds in PyTorch). Times are medians of `triton.testing.do_bench`.
`--kv-heads 8` times grouped-query attention (32 query heads sharing 8 key/value heads, as Llama 3 8B): SDPA runs
with `enable_gqa`, and fla, which has no grouped form, on the keys and values repeated to 32 heads. A script, not a
test: it needs a CUDA GPU.

    python benchmarks/bench_hybrid.py [--lengths 2048 8192 16384 32768] [--kv-heads 8] [tuning overrides: tuning.py]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F
import triton
import tuning

from linearize.kernels.hybrid import HybridState
from linearize.kernels.hybrid.triton_chunk import hybrid_attention_triton
from linearize.kernels.hybrid.triton_recurrent import hybrid_decode_triton

TOKENS = 16384
HEADS, HEAD_DIM, FEATURES, WINDOW = 32, 128, 64, 64
COPY_FLOOR_BYTES_PER_S = 3.0e12

try:
    from fla.ops.linear_attn import chunk_linear_attn
except ImportError:
    chunk_linear_attn = None


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _inputs(B, T, H, Hkv, D, dtype=torch.bfloat16):
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device="cuda") * s).to(dtype)

    q, k, v = rnd(B, T, H, D), rnd(B, T, Hkv, D), rnd(B, T, Hkv, D)
    wq = torch.randn(H, D, FEATURES, device="cuda") * D**-0.5
    wk = torch.randn(H, D, FEATURES, device="cuda") * D**-0.5
    wf = torch.full((H,), -2.197, device="cuda")
    return q, k, v, wq, wk, wf


def _fwd_bwd(run, leaves):
    """Forward and forward+backward times of `run()` (a function of the leaves that returns one tensor)."""
    with torch.no_grad():
        fwd = _median_ms(run)
    for t in leaves:
        t.requires_grad_(True)
    out = run()
    grad = torch.randn_like(out)

    def step():
        for t in leaves:
            t.grad = None
        run().backward(grad)

    both = _median_ms(step)
    for t in leaves:
        t.requires_grad_(False)
        t.grad = None
    return fwd, both


def _ours(q, k, v, wq, wk, wf, window):
    return hybrid_attention_triton(q, k, v, wq, wk, wf, window, q.shape[-1] ** -0.5)[0]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _fla(q, k, v, normalize=True):
    return chunk_linear_attn(q, k, v, normalize=normalize)[0]


def _progress(T, name, times):
    print(f"# T={T} {name}: fwd {times[0]:.3f} ms, fwd+bwd {times[1]:.3f} ms", file=sys.stderr, flush=True)
    return times


def prefill_rows(lengths, kv_heads=HEADS):
    """Yield one row per sequence length, so a long run still shows what it measured so far."""
    for T in lengths:
        B = max(TOKENS // T, 1)
        leaves = _inputs(B, T, HEADS, kv_heads, HEAD_DIM)
        q, k, v = leaves[:3]
        # q, k, v read and o (the size of q) written once.
        row = {"T": T, "B": B, "bytes": (2 * q.numel() + k.numel() + v.numel()) * q.element_size()}
        for name, window in (("hedgehog", 0), ("hybrid", WINDOW)):
            row[name] = _progress(T, name, _fwd_bwd(partial(_ours, *leaves, window), leaves))
        bhtd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
        row["sdpa"] = _progress(T, "sdpa", _fwd_bwd(partial(_sdpa, *bhtd), bhtd))
        if chunk_linear_attn is not None:
            # fla has no grouped-query form: its call gets the keys and values repeated to every query head.
            k, v = (x.repeat_interleave(HEADS // kv_heads, dim=2) for x in (k, v))
            # fla autotunes its kernels on the first call: that can take minutes.
            row["fla"] = _progress(T, "fla", _fwd_bwd(partial(_fla, q, k, v), [q, k, v]))
            plain = partial(_fla, q, k, v, normalize=False)
            row["fla_unnorm"] = _progress(T, "fla_unnorm", _fwd_bwd(plain, [q, k, v]))
        del leaves, q, k, v, bhtd
        torch.cuda.empty_cache()
        yield row


def _graphed(fn):
    """`fn` captured in a CUDA graph: its replay, the step without Python and launch overhead, as a decoding loop
    run under CUDA graphs (torch.compile's "reduce-overhead", serving engines) executes it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def decode_rows(contexts, B=16, H=32, Hkv=8, D=128):
    """Per context length: SDPA over a KV cache and our decode step, each launched eagerly and replayed from a CUDA
    graph (ms)."""
    rows = []
    q, k, v, wq, wk, wf = _inputs(B, 1, H, Hkv, D)
    state = HybridState.zeros(B, H, Hkv, D, D, 2 * FEATURES, WINDOW, torch.bfloat16, torch.device("cuda"))
    state.kv.normal_()
    state.ksum.uniform_(1, 2)
    state.win_k.normal_()
    state.win_v.normal_()
    state.win_mask.fill_(True)

    def step():
        return hybrid_decode_triton(q, k, v, wq, wk, wf, WINDOW, D**-0.5, None, None, state)

    ours = (_median_ms(step), _median_ms(_graphed(step)))
    for L in contexts:
        kc = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        sdpa = partial(F.scaled_dot_product_attention, q.transpose(1, 2), kc, vc, enable_gqa=True)
        rows.append((L, (_median_ms(sdpa), _median_ms(_graphed(sdpa))), ours))
        del kc, vc, sdpa
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument(
        "--kv-heads", type=int, default=HEADS, help=f"key/value heads of the prefill (a divisor of {HEADS})"
    )
    tuning.add_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_hybrid.py needs a CUDA GPU")
    if args.kv_heads < 1 or HEADS % args.kv_heads:
        raise SystemExit(f"--kv-heads must divide the {HEADS} query heads, got {args.kv_heads}")
    settings = tuning.apply(args)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {settings}")
    print(f"# prefill: B*T = {TOKENS} tokens, H={HEADS}, Hkv={args.kv_heads}, D={HEAD_DIM}, F={FEATURES}, bf16; ms")
    names = ["hedgehog", "hybrid", "sdpa"] + (["fla", "fla_unnorm"] if chunk_linear_attn is not None else [])
    print("| T (B) | " + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|", flush=True)
    rows = []
    for r in prefill_rows(args.lengths, args.kv_heads):
        rows.append(r)
        cells = " | ".join(f"{r[n][0]:.2f} | {r[n][1]:.2f}" for n in names)
        print(f"| {r['T']} ({r['B']}) | {cells} |", flush=True)
    print("\n# forward bandwidth: bytes of q, k, v read and o written once, against the 3.0 TB/s copy floor")
    print("| T | bytes (MB) | floor ms | hedgehog TB/s | hybrid TB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        floor = r["bytes"] / COPY_FLOOR_BYTES_PER_S * 1e3
        tbs = [r["bytes"] / (r[n][0] * 1e-3) / 1e12 for n in ("hedgehog", "hybrid")]
        print(f"| {r['T']} | {r['bytes'] / 1e6:.0f} | {floor:.3f} | {tbs[0]:.2f} | {tbs[1]:.2f} |")
    print(f"\n# decode step: B=16, 32 query / 8 KV heads, D=128, F={FEATURES}, W={WINDOW}; ms")
    print("| context | SDPA with KV cache | hybrid decode (state + window) | SDPA, CUDA graph | hybrid, CUDA graph |")
    print("|---|---|---|---|---|")
    for L, sdpa, ours in decode_rows(args.contexts):
        print(f"| {L} | {sdpa[0]:.3f} | {ours[0]:.3f} | {sdpa[1]:.3f} | {ours[1]:.3f} |")


if __name__ == "__main__":
    main()
