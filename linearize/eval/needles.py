"""Needle-in-a-haystack probes in the style of RULER, scored by greedy generation through the model's cache.

- `niah_single` (RULER S-NIAH): one needle "One of the special magic numbers for <key> is: <7 digits>." in filler
  text, at depths spread evenly over the trials; asked for that key's number.
- `niah_multikey` (MK-NIAH): four needles with different keys at random depths (three are distractors); asked for
  one key's number.
- `niah_multivalue` (MV-NIAH): four needles with the same key and different numbers; asked for all of them; the
  score of a trial is the fraction of the numbers that appear in the answer (RULER's string_match_all).

Keys, numbers and positions come from a string seed per (seed, probe, length, trial), so prompts are identical
across runs, machines and models. The filler is RULER's repeated noise sentences; prompts are built to at most
`length` tokens of the model's tokenizer.
"""

from __future__ import annotations

import random

from .recall import FILLER, _generate

NIAH_PROBES = ("niah_single", "niah_multikey", "niah_multivalue")
NEEDLES = 4
ADJECTIVES = "amber brave calm dusty eager faint gentle hollow icy jolly keen lucky misty noble odd proud quiet".split()
NOUNS = (
    "anchor badger cactus dolphin ember falcon glacier harbor iris jungle kettle lantern meadow nectar orchid".split()
)
TEMPLATE = "One of the special magic numbers for {key} is: {value}. "
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def needle_prompt(tokenizer, probe: str, length: int, trial: int, trials: int, seed: int = 0) -> tuple[str, list[str]]:
    """The prompt of one trial and the numbers its answer must contain."""
    rng = random.Random(f"{seed}-{probe}-{length}-{trial}")
    if probe == "niah_single":
        needles = [(_key(rng), str(rng.randint(1_000_000, 9_999_999)))]
        asked, wanted = needles[0][0], [needles[0][1]]
    elif probe == "niah_multikey":
        keys = []
        while len(keys) < NEEDLES:
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        needles = [(k, str(rng.randint(1_000_000, 9_999_999))) for k in keys]
        asked, value = needles[rng.randrange(NEEDLES)]
        wanted = [value]
    elif probe == "niah_multivalue":
        key = _key(rng)
        values = rng.sample(range(1_000_000, 10_000_000), NEEDLES)
        needles = [(key, str(v)) for v in values]
        asked, wanted = key, [str(v) for v in values]
    else:
        raise ValueError(probe)
    if probe == "niah_multivalue":
        question = (
            f"What are all the special magic numbers for {asked} mentioned in the provided text? "
            f"The special magic numbers for {asked} mentioned in the provided text are"
        )
    else:
        question = (
            f"What is the special magic number for {asked} mentioned in the provided text? "
            f"The special magic number for {asked} mentioned in the provided text is"
        )
    texts = [TEMPLATE.format(key=k, value=v) for k, v in needles]
    fixed = len(tokenizer.encode(INTRO + "".join(texts) + "\n" + question, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n_filler = max(0, (length - fixed) // per_filler)
    if probe == "niah_single":
        slots = [round(n_filler * trial / max(trials - 1, 1))]
    else:
        slots = sorted(rng.randint(0, n_filler) for _ in needles)
    parts, cursor = [INTRO], 0
    for slot, text in zip(slots, texts, strict=True):
        parts.append(FILLER * (slot - cursor) + text)
        cursor = slot
    parts.append(FILLER * (n_filler - cursor) + "\n" + question)
    return "".join(parts), wanted


def niah(model, tokenizer, probe: str, lengths: list[int], trials: int = 10, seed: int = 0) -> list[dict]:
    """Per-trial scores of one probe at each length: [{"probe", "length", "scores": [...]}]."""
    rows = []
    for length in lengths:
        scores = []
        for trial in range(trials):
            prompt, wanted = needle_prompt(tokenizer, probe, length, trial, trials, seed)
            answer = _generate(model, tokenizer, prompt, 12 * len(wanted))
            scores.append(sum(w in answer for w in wanted) / len(wanted))
        rows.append({"probe": probe, "length": length, "scores": scores})
    return rows
