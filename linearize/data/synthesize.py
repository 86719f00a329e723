"""A distillation corpus sampled from the teacher itself.

When no large corpus is at hand (or its licence is in doubt), the teacher's own continuations are the natural
distillation text: they are what the student must imitate. `write_corpus` cuts the documents of a data source into
a training part and a held-out part, samples continuations of the first `prompt_tokens` tokens of each training
document (cycling through them until the token target is met), and writes

    <out>/train.jsonl   {"text": prompt + continuation} rows, then the real training documents (unless excluded)
    <out>/heldout.txt   the held-out real documents, one per paragraph, never used as prompts (for `ppl:` eval)
    <out>/corpus.json   model, settings, counts and timing

The work goes in batches of `batch_size` prompts, each sampled with its own seed (`seed + batch index`), and
`corpus.json` records the byte length of train.jsonl after each finished batch: an interrupted run continues with
`resume=True` from the last finished batch and gives the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import LinearizeError
from ..fileio import atomic_write_text
from .sources import load_documents

logger = logging.getLogger(__name__)

INFO = "corpus.json"
TRAIN = "train.jsonl"
HELDOUT = "heldout.txt"


@dataclass
class CorpusSettings:
    """How the corpus is sampled.

    Attributes:
        tokens: target number of generated tokens (prompts excluded).
        prompts: data source of the prompt documents (`data.dataset` syntax: "auto", a file, a Hub id).
        heldout_fraction: share of the documents kept out of prompts and training text.
        prompt_tokens: tokens of each document given as the prompt.
        max_new_tokens: longest continuation.
        batch_size: prompts sampled together.
        temperature, top_p: sampling settings (temperature 1, top_p 1: the teacher's own distribution).
        seed: seed of the document split and of the sampling.
        include_documents: also write the real training documents as rows.
    """

    tokens: int = 1_000_000
    prompts: str = "auto"
    heldout_fraction: float = 0.1
    prompt_tokens: int = 32
    max_new_tokens: int = 512
    batch_size: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    include_documents: bool = True

    def __post_init__(self):
        for name in ("tokens", "prompt_tokens", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise LinearizeError(f"corpus {name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.tokens = int(self.tokens)
        if not 0 <= self.heldout_fraction < 1:
            raise LinearizeError(f"--heldout must be in [0, 1), got {self.heldout_fraction}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise LinearizeError("--temperature must be > 0 and --top-p in (0, 1]")


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, the last `fraction` held out (at least one if > 0)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(docs) * fraction))
    if fraction > 0:
        n_held = min(max(n_held, 1), len(docs) - 1)
    train = [docs[i] for i in sorted(order[: len(docs) - n_held])]
    held = [docs[i] for i in sorted(order[len(docs) - n_held :])]
    return train, held


def _prompts(tokenizer, docs: list[str], n_tokens: int) -> list[list[int]]:
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:n_tokens]
        if ids:
            out.append(ids)
    if not out:
        raise LinearizeError("no prompt documents left after tokenisation")
    return out


def _sample_batch(model, tokenizer, prompts: list[list[int]], settings: CorpusSettings, seed: int):
    """Continuations (token lists, up to and without the first EOS) of one batch of left-padded prompts."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + p for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
        )
    eos = tokenizer.eos_token_id
    new = out[:, width:].tolist()
    result = []
    for row in new:
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        result.append(row)
    return result


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_corpus(model, tokenizer, out: str | Path, settings: CorpusSettings, model_name: str = "",
                 resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Sample the corpus into `out` (see the module docstring); returns the contents of corpus.json."""
    from .. import outdir

    final = Path(out).expanduser()
    inputs = [model_name, settings.prompts]
    # A replacement is sampled beside the old corpus and swapped in when complete; an interrupted one resumes there.
    staging = outdir.staging_folder(final)
    if resume and not overwrite and (staging / INFO).is_file():
        state, out = "resume", staging
    else:
        state = outdir.check_output(final, "corpus", overwrite, resume, inputs, hint="pass --resume to continue it, ")
        out = staging if state == "replace" else final
    if state == "replace":
        outdir.discard(out)
    info_path = out / INFO
    if state == "resume" and not info_path.exists():
        raise LinearizeError(f"--resume: {out} holds no {INFO}; it was not written by `linearize corpus`")
    resume = state == "resume"
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        outdir.write_marker(out, "corpus")

    docs, where = load_documents(DataConfig(dataset=settings.prompts), tokenizer)
    train_docs, held_docs = split_documents(docs, settings.heldout_fraction, settings.seed)
    prompts = _prompts(tokenizer, train_docs, settings.prompt_tokens)
    info = {
        "model": model_name,
        "prompt_source": where,
        "settings": asdict(settings),
        "documents": {"train": len(train_docs), "heldout": len(held_docs)},
        "batches_done": 0,
        "train_bytes": 0,
        "generated_tokens": 0,
        "rows": 0,
        "seconds": 0.0,
        "complete": False,
    }
    if resume and info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("settings") != info["settings"] or old.get("model") != model_name:
            raise LinearizeError(
                f"--resume: {out} was sampled with other settings or another model; use --overwrite to start over"
            )
        info = old
        if info.get("complete"):
            logger.info("corpus in %s is already complete", out)
            return info
    # Drop whatever an interrupted batch appended after the last recorded one.
    train_path = out / TRAIN
    with open(train_path, "ab") as fh:
        fh.truncate(info["train_bytes"])
    if not (out / HELDOUT).exists() or not resume:
        atomic_write_text(out / HELDOUT, "\n\n".join(held_docs) + ("\n" if held_docs else ""))

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.tokens, initial=info["generated_tokens"], unit="tok", desc="sampling",
               dynamic_ncols=True, disable=not progress)  # fmt: skip
    start = time.perf_counter() - info["seconds"]
    while info["generated_tokens"] < settings.tokens:
        b = info["batches_done"]
        idx = [(b * settings.batch_size + i) % len(prompts) for i in range(settings.batch_size)]
        batch_prompts = [prompts[i] for i in idx]
        conts = _sample_batch(model, tokenizer, batch_prompts, settings, settings.seed + b)
        lines = []
        n_new = 0
        for p, c in zip(batch_prompts, conts, strict=True):
            if not c:
                continue
            n_new += len(c)
            lines.append(json.dumps({"text": tokenizer.decode(p + c, skip_special_tokens=True)}) + "\n")
        with open(train_path, "a", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        info.update(
            batches_done=b + 1,
            train_bytes=train_path.stat().st_size,
            generated_tokens=info["generated_tokens"] + n_new,
            rows=info["rows"] + len(lines),
            seconds=round(time.perf_counter() - start, 2),
        )
        _atomic_json(info_path, info)
        bar.update(n_new)
        bar.set_postfix(tok_s=f"{info['generated_tokens'] / max(info['seconds'], 1e-9):,.0f}")
    bar.close()
    if settings.include_documents:
        with open(train_path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in train_docs)
        info["rows"] += len(train_docs)
    info.update(complete=True, train_bytes=train_path.stat().st_size,
                tokens_per_second=round(info["generated_tokens"] / max(info["seconds"], 1e-9)))  # fmt: skip
    _atomic_json(info_path, info)
    if out != final:
        outdir.publish(out, final)
    return info
