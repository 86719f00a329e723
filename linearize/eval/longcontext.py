"""The long-context section of the report: perplexity against context length, generated answers to SQuAD, DROP
and CoQA at their own length and inside longer haystacks, needle probes, and the cache size of every model.

Every measure runs on every subject (teacher, student, the student's controls, extra models) with the same
documents and prompts; scores carry standard errors over documents and recoveries (subject / teacher) 95%
paired-bootstrap intervals, so a gap inside the noise is shown as such.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .cache_size import cache_bytes_at, cache_profile, describe
from .long_ppl import load_documents, long_perplexity
from .needles import NIAH_PROBES, niah
from .qa import QA_TASKS, score_qa
from .recall import passkey
from .stats import mean_se, ppl_ratio_ci, ratio_ci, weighted_nll, within_noise

logger = logging.getLogger(__name__)

LONG_TASKS = (*QA_TASKS, "niah", *NIAH_PROBES)

# What each control switches off, by branch of the converted attention (window, linear, kept softmax, sparse cache).
BRANCHES = {
    "window-only": "removes the linear branch and any sparse cache (keeps the sliding window and any softmax layers)",
    "linear-only": "removes the sliding window and any sparse cache (keeps the linear branch and any softmax layers)",
}


@dataclass
class Subject:
    """A model scored in the section; `enter` wraps each measurement (e.g. a control's attention variant)."""

    name: str
    model: object
    tokenizer: object
    enter: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def niah_probes(tasks: list[str]) -> list[str]:
    return [p for p in NIAH_PROBES if p in tasks or "niah" in tasks]


def _recovery_fields(scores: list[float], teacher: list[float] | None) -> dict:
    if not scores or teacher is None or len(teacher) != len(scores):
        return {}
    t, _ = mean_se(teacher)
    s, _ = mean_se(scores)
    lo, hi = ratio_ci(scores, teacher)
    return {
        "recovery": s / t if t else None,
        "recovery_lo": lo,
        "recovery_hi": hi,
        "within_noise": within_noise(scores, teacher),
    }


def _ppl(subjects: list[Subject], settings, teacher: str | None) -> dict:
    sources, rows = [], []
    lengths = sorted(settings.context_lengths)
    for item in [t for t in settings.tasks if t.startswith("ppl:")]:
        source = item[4:]
        docs, skipped = load_documents(subjects[0].tokenizer, source, max(lengths), settings.ppl_docs)
        ids = [d for _, d in docs]
        sources.append({"source": source, "docs": len(docs), "skipped_short": skipped, "tokens_per_doc": max(lengths)})
        tokens = [len(d) for d in ids]
        nll = {}
        for s in subjects:
            with s.enter():
                nll[s.name] = long_perplexity(s.model, s.tokenizer, ids, lengths, settings.batch_size)
        for s in subjects:
            for length in lengths:
                mean, se = weighted_nll(nll[s.name][length], tokens)
                row = {"source": source, "model": s.name, "length": length, "ppl": math.exp(mean)}
                row["ppl_lo"], row["ppl_hi"] = (
                    (math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)) if se else (None, None)
                )
                if teacher and s.name != teacher:
                    row["ratio"], row["ratio_lo"], row["ratio_hi"] = ppl_ratio_ci(
                        nll[s.name][length], nll[teacher][length], tokens
                    )
                rows.append(row)
    return {"lengths": lengths, "sources": sources, "rows": rows}


def _qa(subjects: list[Subject], settings, teacher: str | None) -> list[dict]:
    rows = []
    settings_list = [(None, None)] + [(n, d) for n in settings.qa_lengths for d in settings.qa_depths]
    for task in [t for t in QA_TASKS if t in settings.tasks]:
        limit = settings.qa_limit or settings.task_limits.get(task, settings.limit)
        for length, depth in settings_list:
            per = {}
            for s in subjects:
                with s.enter():
                    per[s.name] = score_qa(s.model, s.tokenizer, task, limit, length, depth or 0.0,
                                           settings.qa_max_new_tokens, settings.seed)  # fmt: skip
            base = per.get(teacher) if teacher else None
            for s in subjects:
                got = per[s.name]
                row = {"task": task, "length": length, "depth": depth, "model": s.name, "n": len(got["ids"]),
                       "tokens": got["tokens"], "gold_depth": got["gold_depth"], "skipped": got["skipped"]}  # fmt: skip
                for key in ("em", "f1", "contains"):
                    row[key], row[f"{key}_se"] = mean_se(got[key])
                if base is not None and s.name != teacher:
                    common = set(got["ids"]) & set(base["ids"])
                    mine = [v for i, v in zip(got["ids"], got["f1"], strict=True) if i in common]
                    theirs = [v for i, v in zip(base["ids"], base["f1"], strict=True) if i in common]
                    row.update(_recovery_fields(mine, theirs))
                rows.append(row)
                logger.info("%s %s@%s depth %s: f1 %.3f", task, s.name, length or "native", depth, row["f1"])
    return rows


def _needles(subjects: list[Subject], settings, teacher: str | None) -> list[dict]:
    rows = []
    probes = niah_probes(settings.tasks)
    jobs = [(p, settings.niah_lengths) for p in probes]
    if "passkey" in settings.tasks:
        jobs.insert(0, ("passkey", settings.passkey_lengths))
    for probe, lengths in jobs:
        per = {}
        for s in subjects:
            with s.enter():
                if probe == "passkey":
                    per[s.name] = passkey(s.model, s.tokenizer, lengths, settings.passkey_trials, settings.seed)
                else:
                    per[s.name] = niah(s.model, s.tokenizer, probe, lengths, settings.niah_trials, settings.seed)
        for i, length in enumerate(lengths):
            base = per[teacher][i]["scores"] if teacher else None
            for s in subjects:
                scores = per[s.name][i]["scores"]
                acc, se = mean_se(scores)
                row = {"probe": probe, "length": length, "model": s.name, "n": len(scores), "accuracy": acc, "se": se}
                if s.name != teacher:
                    row.update(_recovery_fields(scores, base))
                rows.append(row)
    return rows


def _cache(subjects: list[Subject], settings, teacher: str | None) -> list[dict]:
    rows, teacher_bytes = [], {}
    for s in subjects:
        with s.enter():
            profile = cache_profile(s.model)
        at = {str(n): cache_bytes_at(profile, n) for n in settings.cache_lengths}
        rows.append({"model": s.name, "layers": describe(profile), "at": at})
        if s.name == teacher:
            teacher_bytes = {n: v["total"] for n, v in at.items()}
    for row in rows:
        if teacher_bytes:
            row["fraction_of_teacher"] = {n: v["total"] / teacher_bytes[n] for n, v in row["at"].items()}
    return rows


def long_context(subjects: list[Subject], settings, teacher: str | None = "teacher") -> dict:
    """The section's dict; empty when no long-context measure was asked for."""
    wants_ppl = settings.context_lengths and any(t.startswith("ppl:") for t in settings.tasks)
    wanted = [t for t in settings.tasks if t in LONG_TASKS or t == "passkey"]
    if not (wants_ppl or wanted):
        return {}
    teacher = teacher if teacher in {s.name for s in subjects} else None
    section = {
        "subjects": [s.name for s in subjects],
        "branches": {s.name: BRANCHES[s.name] for s in subjects if s.name in BRANCHES},
        "seconds": {},
    }
    parts = [("cache", _cache), ("perplexity", _ppl)] if wants_ppl else [("cache", _cache)]
    for key, fn in [*parts, ("qa", _qa), ("needles", _needles)]:
        start = time.perf_counter()
        section[key] = fn(subjects, settings, teacher)
        # Wall time of each measure over all subjects, to size later runs.
        section["seconds"][key] = round(time.perf_counter() - start, 1)
    section["settings"] = {
        "context_lengths": list(settings.context_lengths),
        "ppl_docs": settings.ppl_docs,
        "qa_lengths": list(settings.qa_lengths),
        "qa_depths": list(settings.qa_depths),
        "qa_limit": settings.qa_limit,
        "qa_max_new_tokens": settings.qa_max_new_tokens,
        "niah_lengths": list(settings.niah_lengths),
        "niah_trials": settings.niah_trials,
        "passkey_lengths": list(settings.passkey_lengths),
        "passkey_trials": settings.passkey_trials,
        "seed": settings.seed,
    }
    return section
