"""Recall probes that show what a fixed-size state forgets: passkey retrieval and multi-query associative recall.

Both are scored by greedy generation through the model's own cache, so a converted model answers from its
recurrent state, exactly as it would in use. Prompts are generated from a seed, so runs are comparable.
"""

from __future__ import annotations

import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about it.\n"
)
WORDS = (
    "apple river stone cloud tiger lamp garden silver window forest candle mirror bridge copper desk harbor "
    "violin meadow rocket planet falcon island marble pepper anchor basket canyon dragon engine feather"
).split()


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> str:
    """A prompt of about `length` tokens with the pass key at relative `depth` (0 = start, 1 = end)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tokenizer.encode(INTRO + needle + question, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n_filler = max(0, (length - fixed) // per_filler)
    before = round(n_filler * depth)
    return INTRO + FILLER * before + needle + FILLER * (n_filler - before) + question


def passkey(model, tokenizer, lengths: list[int], trials: int = 5, seed: int = 0) -> list[dict]:
    """Accuracy of retrieving a 5-digit pass key at each context length (keys and depths from `seed`)."""
    rows = []
    for length in lengths:
        rng = random.Random(seed * 1000 + length)
        scores = []
        for trial in range(trials):
            key = rng.randint(10000, 99999)
            depth = trial / max(trials - 1, 1)
            answer = _generate(model, tokenizer, passkey_prompt(tokenizer, length, key, depth), 8)
            scores.append(float(str(key) in answer))
        rows.append(
            {"probe": "passkey", "length": length, "accuracy": sum(scores) / trials, "trials": trials, "scores": scores}
        )
    return rows


def mqar(model, tokenizer, n_pairs: list[int], queries: int = 8, seed: int = 0) -> list[dict]:
    """Multi-query associative recall: `n` word -> number pairs, then `queries` questions about them."""
    rows = []
    for n in n_pairs:
        rng = random.Random(seed * 7919 + n)
        scores = []
        for _ in range(max(1, queries // 4)):
            keys = rng.sample(WORDS, min(n, len(WORDS)))
            values = {k: rng.randint(10, 99) for k in keys}
            listing = " ".join(f"{k} {values[k]}." for k in keys)
            for k in rng.sample(keys, min(4, len(keys))):
                answer = _generate(
                    model, tokenizer, f"Remember these numbers: {listing}\nQuestion: {k}? Answer: {k}", 3
                )
                scores.append(float(str(values[k]) in answer))
        rows.append(
            {
                "probe": "mqar",
                "pairs": n,
                "accuracy": sum(scores) / len(scores),
                "queries": len(scores),
                "scores": scores,
            }
        )
    return rows
