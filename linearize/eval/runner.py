"""Evaluate a student against its teacher on a list of tasks and assemble the report.

`--tasks` takes task names (`linearize.eval.tasks.TASKS`), `ppl:<file, folder, shakespeare or stdlib>`,
`passkey`, `mqar`, the generated-answer tasks `squad`, `drop`, `coqa` and the needle probes `niah` (or one of
`niah_single`, `niah_multikey`, `niah_multivalue`). Teacher and student see the same documents, prompts and probes;
controls (window-only, linear-only) rerun the tasks on the student with one branch switched off. The long-context
measures (`longcontext`) run on teacher, student, controls and extra models alike.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LinearizeError
from .controls import CONTROLS, attention_variant, has_both_branches
from .efficiency import measure
from .longcontext import LONG_TASKS, Subject, long_context
from .perplexity import perplexity, read_text
from .recall import mqar
from .report import averages, recovery
from .scorer import Scorer, score_docs
from .stats import mean_se, ratio_ci, within_noise
from .tasks import TASKS, get_task, select_docs

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to evaluate.

    Attributes:
        tasks: task names, `ppl:<path>`, `passkey`, `mqar`.
        limit: documents per task (MMLU: per subject); None for all.
        task_limits: per-task overrides of `limit`, e.g. {"mmlu": 20}.
        batch_size: requests per forward pass.
        passkey_lengths: context lengths of the passkey probe.
        passkey_trials: prompts per length.
        mqar_pairs: numbers of key-value pairs of the associative-recall probe.
        ppl_window: tokens per perplexity window.
        ppl_max_tokens: tokens of each text scored (None: all).
        efficiency_lengths: context lengths of the speed/memory measurement (empty: skip).
        controls: run the window-only / linear-only controls where the student has both branches.
        context_lengths: with `ppl:` tasks, score each text at each of these window lengths (long-context
            section); empty: one window of `ppl_window` tokens.
        ppl_docs: documents of each `ppl:` source scored against context length.
        qa_lengths: prompt lengths (tokens) of the SQuAD/DROP/CoQA haystacks, besides the native prompts.
        qa_depths: relative depths of the gold passage in each haystack.
        qa_limit: questions per generated-answer task (None: `limit`).
        qa_max_new_tokens: longest generated answer (OLMES: 50).
        niah_lengths: context lengths of the needle probes.
        niah_trials: prompts per needle probe and length.
        cache_lengths: context lengths at which the cache size of each model is reported.
        seed: seed of distractors, needles and pass keys.
        long_controls: run the long-context measures on the controls too (not only teacher, student and
            extra models).
    """

    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"])
    limit: int | None = None
    task_limits: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    passkey_trials: int = 5
    mqar_pairs: list[int] = field(default_factory=lambda: [4, 8, 16])
    ppl_window: int = 1024
    ppl_max_tokens: int | None = None
    efficiency_lengths: list[int] = field(default_factory=list)
    controls: bool = True
    context_lengths: list[int] = field(default_factory=list)
    ppl_docs: int = 8
    qa_lengths: list[int] = field(default_factory=list)
    qa_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    qa_limit: int | None = 100
    qa_max_new_tokens: int = 50
    niah_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    niah_trials: int = 10
    cache_lengths: list[int] = field(default_factory=lambda: [4096, 32768])
    seed: int = 0
    long_controls: bool = True


def parse_limit(text: str | None) -> tuple[int | None, dict[str, int]]:
    """`--limit` as "N", "task=N" items or both ("1000,mmlu=20"): the default limit and per-task overrides."""
    if text is None or not str(text).strip():
        return None, {}
    default, per_task = None, {}
    for item in str(text).split(","):
        name, sep, value = item.strip().rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise LinearizeError(f"--limit takes N or TASK=N items (e.g. 1000,mmlu=20), got '{text}'") from None
        if n <= 0:
            raise LinearizeError(f"--limit values must be positive, got '{item.strip()}'")
        if sep:
            get_task(name)
            per_task[name] = n
        else:
            default = n
    return default, per_task


def parse_tasks(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if not (item in TASKS or item.startswith("ppl:") or item in ("passkey", "mqar", *LONG_TASKS)):
            get_task(item)
    if not items:
        raise LinearizeError("--tasks is empty")
    return items


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, leave=False)


def _score_task(model, tokenizer, name: str, settings: EvalSettings, who: str) -> dict:
    task = get_task(name)
    docs = select_docs(task, settings.task_limits.get(name, settings.limit))
    n_requests = sum(len(task.build(d).requests) for d in docs)
    with _progress(n_requests, f"{name} ({who})") as bar:
        return score_docs(Scorer(model, tokenizer, settings.batch_size), task, docs, bar)


def evaluate(
    student,
    tokenizer,
    settings: EvalSettings,
    teacher=None,
    teacher_tokenizer=None,
    student_name: str = "student",
    teacher_name: str | None = None,
    compare: list[tuple[str, object, object]] = (),
) -> dict:
    """Run every requested evaluation on the student (and teacher) and return the report dict.

    Args:
        compare: extra models `(name, model, tokenizer)` scored on the same tasks and listed with the controls,
            e.g. a run of the same recipe without attention transfer ("no-transfer").
    """
    import torch

    teacher_tokenizer = teacher_tokenizer or tokenizer
    models = [("student", student, tokenizer)] + ([("teacher", teacher, teacher_tokenizer)] if teacher else [])
    named = [t for t in settings.tasks if t in TASKS]
    rows, zero_shot = [], set()
    for name in named:
        task = TASKS[name]
        result = {who: _score_task(m, tok, name, settings, who) for who, m, tok in models}
        per_doc = {who: r.pop("per_doc")[task.metric] for who, r in result.items()}
        s = result["student"][task.metric]
        t = result["teacher"][task.metric] if teacher else None
        rec, above = recovery(s, t, task.chance)
        row = {
            "task": name,
            "metric": task.metric,
            "n": result["student"]["n"],
            "teacher": t,
            "student": s,
            "chance": task.chance,
            "recovery": rec,
            "recovery_above_chance": above,
            "notes": task.notes,
            "metrics": result,
        }
        row.update(_uncertainty(per_doc.get("student"), per_doc.get("teacher"), task.chance))
        rows.append(row)
        if task.zero_shot:
            zero_shot.add(name)
        logger.info("%s %s: student %.4f%s", name, task.metric, s, f", teacher {t:.4f}" if t is not None else "")

    long_ppl = bool(settings.context_lengths)
    ppl_items = [] if long_ppl else [item for item in settings.tasks if item.startswith("ppl:")]
    texts = {item[4:]: read_text(item[4:]) for item in ppl_items}

    def ppl(model, tok, text: str) -> dict:
        return perplexity(model, tok, text, settings.ppl_window, settings.batch_size, settings.ppl_max_tokens)

    def side_scores(model, tok, label: str) -> dict:
        scores = {n: _score_task(model, tok, n, settings, label)[TASKS[n].metric] for n in named}
        zs = [scores[n] for n in named if n in zero_shot]
        entry = {"name": label, "tasks": scores, "zero_shot_avg": sum(zs) / len(zs) if zs else None}
        if texts:
            entry["perplexity"] = {src: ppl(model, tok, text)["perplexity"] for src, text in texts.items()}
        return entry

    subjects = ([Subject("teacher", teacher, teacher_tokenizer)] if teacher else []) + [
        Subject("student", student, tokenizer)
    ]
    controls = []
    if settings.controls and has_both_branches(student):
        for variant in CONTROLS:
            if settings.long_controls:
                subjects.append(Subject(variant, student, tokenizer, lambda v=variant: attention_variant(student, v)))
            if named or texts:
                with attention_variant(student, variant):
                    controls.append(side_scores(student, tokenizer, variant))
    for label, model, tok in compare:
        subjects.append(Subject(label, model, tok))
        controls.append(side_scores(model, tok, label))
    section = long_context(subjects, settings, "teacher" if teacher else None)
    passkey_acc = {
        (r["model"], r["length"]): r for r in section.get("needles", []) if r["probe"] == "passkey"
    }  # fmt: skip
    for entry in controls:
        recall = {f"passkey@{n}": r["accuracy"] for (who, n), r in passkey_acc.items() if who == entry["name"]}
        if recall:
            entry["recall"] = recall

    ppl_rows = []
    for src, text in texts.items():
        result = {who: ppl(m, tok, text) for who, m, tok in models}
        s, t = result["student"], result.get("teacher")
        ppl_rows.append(
            {
                "source": src,
                "tokens": s["tokens"],
                "student": s["perplexity"],
                "student_bpb": s["bits_per_byte"],
                "teacher": t["perplexity"] if t else None,
                "teacher_bpb": t["bits_per_byte"] if t else None,
                "ratio": s["perplexity"] / t["perplexity"] if t else None,
            }
        )

    recall_rows = []
    if "passkey" in settings.tasks:
        for length in settings.passkey_lengths:
            s, t = passkey_acc[("student", length)], passkey_acc.get(("teacher", length))
            recall_rows.append(
                {"probe": "passkey", "length": length, "trials": s["n"], "student": s["accuracy"],
                 "student_se": s["se"], "teacher": t["accuracy"] if t else None, "teacher_se": t["se"] if t else None}
            )  # fmt: skip
    if "mqar" in settings.tasks:
        per_model = {who: mqar(m, tok, settings.mqar_pairs, seed=settings.seed) for who, m, tok in models}
        for i, row in enumerate(per_model["student"]):
            t = per_model["teacher"][i] if teacher else None
            recall_rows.append(
                {"probe": "mqar", "pairs": row["pairs"], "queries": row["queries"], "student": row["accuracy"],
                 "student_se": mean_se(row["scores"])[1], "teacher": t["accuracy"] if t else None,
                 "teacher_se": mean_se(t["scores"])[1] if t else None}
            )  # fmt: skip
    efficiency = {}
    if settings.efficiency_lengths:
        for who, m, _ in models:
            efficiency[who] = measure(m, settings.efficiency_lengths)

    device = next(student.parameters()).device
    return {
        "model": student_name,
        "teacher": teacher_name,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "limit": settings.limit,
        "task_limits": dict(settings.task_limits),
        "tasks": rows,
        "averages": averages(rows, zero_shot) if teacher else {},
        "controls": controls,
        "perplexity": ppl_rows,
        "recall": recall_rows,
        "efficiency": efficiency,
        "long_context": section,
    }


def _uncertainty(student: list[float] | None, teacher: list[float] | None, chance: float) -> dict:
    """Standard errors over documents, 95% paired-bootstrap intervals of the recoveries, and whether the
    student-teacher gap is inside the noise."""
    out = {"student_se": mean_se(student)[1] if student else None}
    if teacher:
        out["teacher_se"] = mean_se(teacher)[1]
        out["recovery_lo"], out["recovery_hi"] = ratio_ci(student, teacher)
        lo, hi = ratio_ci(student, teacher, chance)
        out["recovery_above_chance_lo"], out["recovery_above_chance_hi"] = lo, hi
        out["within_noise"] = within_noise(student, teacher)
    return out


def attach_training(report: dict, model_folder: Path) -> dict:
    """Add the run's per-layer transfer error and stage summary when the model folder holds a run."""
    summary = Path(model_folder) / "run" / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        report["transfer_layer_mse"] = data.get("transfer_layer_mse") or {}
        report["transfer_objective"] = data.get("transfer_objective") or "attention_output"
        report["recipe"] = data.get("recipe")
        report["training"] = data.get("stages", [])
    return report
