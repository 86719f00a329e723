"""Decoding-cache size of SmolLM2-135M-shaped students at 4k and 32k tokens, from their settings alone.

    python benchmarks/cache_sizes.py

Uses `linearize.attention.footprint.cache_bytes_at` (bf16 keys/values, fp32 linear states, batch 1); the kept heads
of `gdn-retrieval` are the 9 of 90 its copy probe chose on SmolLM2-135M, in 7 layers (each layer with kept heads
also holds a padding mask of one byte per token, so the place of the heads changes the size by a few KB).
"""

from transformers import LlamaConfig

from linearize.attention.footprint import cache_bytes_at

SHAPE = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152)  # fmt: skip
KEPT_HEADS = {"17": [1], "18": [2], "20": [1, 2], "21": [2], "22": [2], "23": [0, 2], "24": [0]}
ROWS = {
    "lolcats": ("lolcats", {}),
    "lolcats, sparse cache K=64": ("lolcats", {"sparse_cache": 64}),
    "lolcats, sparse cache K=256": ("lolcats", {"sparse_cache": 256}),
    "lolcats, learned eviction K=64 (lolcats-evict)": ("lolcats", {"sparse_cache": 64, "sparse_scorer": "learned"}),
    "gdn-retrieval (9 of 90 kv heads kept)": (
        "gdn",
        {"softmax_heads": KEPT_HEADS, "options": {"output_gate": True, "conv_kernel": 0, "rope": False}},
    ),
}


def main() -> None:
    print("| student | cache at 4k | of teacher | cache at 32k | of teacher |")
    print("|---|---|---|---|---|")
    for name, (kind, attention) in ROWS.items():
        config = LlamaConfig(**SHAPE)
        config.linearize = {"layers": {str(i): kind for i in range(30)}, "attention": {"kind": kind, **attention}}
        a, b = cache_bytes_at(config, 4096), cache_bytes_at(config, 32768)
        print(
            f"| {name} | {a['total'] / 2**20:.2f} MiB | {a['ratio']:.1%} | {b['total'] / 2**20:.2f} MiB | "
            f"{b['ratio']:.1%} |"
        )
    print(f"teacher: {a['teacher'] / 2**20:.1f} MiB at 4k, {b['teacher'] / 2**20:.1f} MiB at 32k")


if __name__ == "__main__":
    main()
