"""Speed and memory of a converted model against its teacher, at the shape of a real checkpoint.

Weights are random (speed and memory do not depend on their values), so no download is needed:

    python benchmarks/bench_models.py --shape llama-3.2-1b --lengths 1024,4096,16384,32768 --device cuda

prints one table row per (model, context length): prefill tokens/s, decode ms/token, cache MB, peak MB.
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers

from linearize import AttentionConfig, convert
from linearize.eval.efficiency import measure
from linearize.models.twin import shallow_twin

SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--kind", default="lolcats")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    config = transformers.LlamaConfig(
        **SHAPES[args.shape],
        max_position_embeddings=max(lengths) + 1024,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    teacher = transformers.LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    student = convert(shallow_twin(teacher), AttentionConfig(kind=args.kind))
    rows = []
    for name, model in (("teacher", teacher), ("student", student)):
        # Warm-up: kernel compilation and library handles stay out of the timed runs.
        measure(model, [min(lengths)], decode_tokens=2)
        for row in measure(model, lengths, decode_tokens=args.decode_tokens, batch_size=args.batch_size, repeats=2):
            rows.append({"model": name, **row})
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.shape} ({args.dtype}, batch {args.batch_size}, kind {args.kind}) on {device}")
    print("| model | context | prefill tok/s | decode ms/token | cache MB | peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_memory_mb']:,.0f}" if "peak_memory_mb" in r else "-"
        print(
            f"| {r['model']} | {r['length']} | {r['prefill_tokens_per_s']:,.0f} | {r['decode_ms_per_token']:.2f} | "
            f"{r['cache_mb']:,.1f} | {peak} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": args.shape, "device": device, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
