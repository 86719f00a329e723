"""Speed of the gated kinds (gla, liger, lizard, lawcat, gdn) against lolcats and SDPA, per attention layer.

Each kind's module is built around one Llama-shaped softmax attention layer (hidden 4096, 32 query heads, 8 key/
value heads, head size 128, bf16) and timed on `attention_heads` (projections, feature maps, gates, conv, both
branches; without o_proj), forward and forward+backward at B*T = 16k tokens, then a one-token decoding step at B=16
from the state a prefill left. SDPA is the teacher layer's own attention with PyTorch's flash kernel, its decoding
step against a key/value cache of `--contexts` tokens. The gated kinds run fla's kernels when fla-core is
installed (`--kernels torch` forces the PyTorch path); `gdn`'s backward takes the PyTorch path where fla refuses it
(Hopper with Triton >= 3.4, < 3.7.1 and no tilelang), which the script says. Medians of `triton.testing.do_bench`.
A script, not a test: it needs a CUDA GPU.

    python benchmarks/bench_gated.py [--lengths 2048 8192 16384 32768] [--kinds gla liger lizard lawcat gdn lolcats]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import transformers
import triton

from linearize.attention import RecurrentLayer, get_attention_kind
from linearize.config import AttentionConfig

TOKENS = 16384
DECODE_BATCH = 16


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _teacher_layer():
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                      num_hidden_layers=1, intermediate_size=64, vocab_size=128)  # fmt: skip
    config._attn_implementation = "sdpa"
    layer = transformers.models.llama.modeling_llama.LlamaAttention(config, 0).to("cuda", torch.bfloat16)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).to("cuda")
    return layer, rotary


def _build(kind: str, teacher):
    cfg = AttentionConfig(kind=kind)
    module = get_attention_kind(kind).build(teacher, cfg, 0).to("cuda")
    # As the pipeline keeps them: the new (trained) parameters in fp32, the teacher's in bf16.
    module.float_new_parameters()
    return module


class _OneLayerCache:
    """What a converted module asks of the cache: its layer's recurrent slot."""

    def __init__(self):
        self.layer = RecurrentLayer()

    def recurrent_layer(self, idx):
        return self.layer


def _fwd_bwd(run, hidden):
    with torch.no_grad():
        fwd = _median_ms(run)
    hidden.requires_grad_(True)
    grad = torch.randn_like(run())

    def step():
        hidden.grad = None
        run().backward(grad)

    both = _median_ms(step)
    hidden.requires_grad_(False)
    return fwd, both


def prefill_rows(lengths, kinds, teacher, rotary):
    for T in lengths:
        B = max(TOKENS // T, 1)
        hidden = torch.randn(B, T, 4096, device="cuda", dtype=torch.bfloat16)
        pe = rotary(hidden, torch.arange(T, device="cuda")[None].expand(B, T))
        row = {"T": T, "B": B}
        row["sdpa"] = _fwd_bwd(lambda h=hidden, p=pe: teacher(h, p, attention_mask=None)[0], hidden)
        for kind in kinds:
            module = _build(kind, teacher)
            row[kind] = _fwd_bwd(lambda m=module, h=hidden, p=pe: m.attention_heads(h, p), hidden)
            print(f"# T={T} {kind}: {row[kind][0]:.2f} / {row[kind][1]:.2f} ms", file=sys.stderr, flush=True)
        yield row


def decode_rows(contexts, kinds, teacher, rotary):
    B = DECODE_BATCH
    row = {}
    one = torch.randn(B, 1, 4096, device="cuda", dtype=torch.bfloat16)
    pe_one = rotary(one, torch.full((B, 1), 512, device="cuda"))
    with torch.no_grad():
        for kind in kinds:
            module, cache = _build(kind, teacher), _OneLayerCache()
            # The state has the same size after any number of tokens: a 512-token prefill gives its shape.
            prompt = torch.randn(B, 512, 4096, device="cuda", dtype=torch.bfloat16)
            module.attention_heads(prompt, rotary(prompt, torch.arange(512, device="cuda")[None]), cache=cache)
            row[kind] = _median_ms(lambda m=module, c=cache: m.attention_heads(one, pe_one, cache=c))
        H, Hkv, D = 32, 8, 128
        for ctx in contexts:
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, Hkv, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            row[f"sdpa@{ctx}"] = _median_ms(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--kinds", nargs="+", default=["gla", "liger", "lizard", "lawcat", "lolcats"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--kernels", choices=["auto", "torch"], default="auto")
    args = parser.parse_args()
    os.environ["LINEARIZE_KERNELS"] = args.kernels
    torch.manual_seed(0)
    if "gdn" in args.kinds:
        from linearize.kernels.delta import delta_backend

        probe = torch.empty(1, device="cuda")
        print(f"# gdn runs on {delta_backend(probe)}, its backward on {delta_backend(probe, needs_grad=True)}",
              file=sys.stderr)  # fmt: skip
    teacher, rotary = _teacher_layer()
    names = ["sdpa", *args.kinds]
    print("| T | B | " + " | ".join(f"{n} fwd / fwd+bwd (ms)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in prefill_rows(args.lengths, args.kinds, teacher, rotary):
        cells = " | ".join(f"{row[n][0]:.2f} / {row[n][1]:.2f}" for n in names)
        print(f"| {row['T']} | {row['B']} | {cells} |", flush=True)
    row = decode_rows(args.contexts, args.kinds, teacher, rotary)
    print(f"\nDecoding step, B={DECODE_BATCH} (ms):")
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{t:.3f}" for t in row.values()) + " |")


if __name__ == "__main__":
    main()
