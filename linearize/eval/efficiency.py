"""Speed and memory against context length: prefill throughput, decode latency, cache size, peak memory.

Timings synchronise the device around each measured region and take the median of repeats; the cache size is
what the model keeps between decoding steps (key/value tensors for softmax layers, recurrent state for converted
layers), which is what decides how long a context fits in memory.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import _compat
from ..attention.cache import cache_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    model, lengths: list[int], decode_tokens: int = 16, batch_size: int = 1, repeats: int = 1, seed: int = 0
) -> list[dict]:
    """One row per context length: prefill tokens/s, decode ms/token, cache MB and (on CUDA) peak memory MB."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(10, vocab, (batch_size, length), generator=gen).to(device)
        prefill_times, decode_times = [], []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            prefill_times.append(time.perf_counter() - start)
            cache = _compat.output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(decode_tokens):
                _sync(device)
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **{_compat.CACHE_KWARG: cache})
                _sync(device)
                steps.append(time.perf_counter() - start)
                cache = _compat.output_cache(out)
                token = out.logits[:, -1:].argmax(-1)
            decode_times.append(statistics.median(steps))
        row = {
            "length": length,
            "batch_size": batch_size,
            "prefill_tokens_per_s": batch_size * length / statistics.median(prefill_times),
            "decode_ms_per_token": 1000 * statistics.median(decode_times),
            "cache_mb": cache_bytes(cache) / 2**20,
        }
        if device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
    return rows
