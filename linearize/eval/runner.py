"""Evaluate a student against its teacher on a list of tasks and assemble the report.

`--tasks` takes task names (`linearize.eval.tasks.TASKS`), `ppl:<file or folder>`, `passkey` and `mqar`. Teacher
and student see the same documents, prompts and probes; controls (window-only, linear-only) rerun the
multiple-choice tasks on the student with one branch switched off.
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
from .perplexity import perplexity, read_text
from .recall import mqar, passkey
from .report import averages, recovery
from .scorer import Scorer, score_docs
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
        if not (item in TASKS or item.startswith("ppl:") or item in ("passkey", "mqar")):
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
        s = result["student"][task.metric]
        t = result["teacher"][task.metric] if teacher else None
        rec, above = recovery(s, t, task.chance)
        rows.append(
            {
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
        )
        if task.zero_shot:
            zero_shot.add(name)
        logger.info("%s %s: student %.4f%s", name, task.metric, s, f", teacher {t:.4f}" if t is not None else "")

    ppl_items = [item for item in settings.tasks if item.startswith("ppl:")]
    texts = {item[4:]: read_text(item[4:]) for item in ppl_items}

    def ppl(model, tok, text: str) -> dict:
        return perplexity(model, tok, text, settings.ppl_window, settings.batch_size, settings.ppl_max_tokens)

    def side_scores(model, tok, label: str, with_recall: bool) -> dict:
        scores = {n: _score_task(model, tok, n, settings, label)[TASKS[n].metric] for n in named}
        zs = [scores[n] for n in named if n in zero_shot]
        entry = {"name": label, "tasks": scores, "zero_shot_avg": sum(zs) / len(zs) if zs else None}
        if texts:
            entry["perplexity"] = {src: ppl(model, tok, text)["perplexity"] for src, text in texts.items()}
        if with_recall and "passkey" in settings.tasks:
            rows = passkey(model, tok, settings.passkey_lengths, settings.passkey_trials)
            entry["recall"] = {f"passkey@{r['length']}": r["accuracy"] for r in rows}
        return entry

    controls = []
    if settings.controls and (named or texts) and has_both_branches(student):
        for variant in CONTROLS:
            with attention_variant(student, variant):
                controls.append(side_scores(student, tokenizer, variant, with_recall=False))
    for label, model, tok in compare:
        controls.append(side_scores(model, tok, label, with_recall=True))

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
    for probe, fn, sizes in (("passkey", passkey, settings.passkey_lengths), ("mqar", mqar, settings.mqar_pairs)):
        if probe not in settings.tasks:
            continue
        per_model = {}
        for who, m, tok in models:
            per_model[who] = fn(m, tok, sizes, settings.passkey_trials) if probe == "passkey" else fn(m, tok, sizes)
        for i, row in enumerate(per_model["student"]):
            entry = {k: v for k, v in row.items() if k != "accuracy"}
            entry["student"] = row["accuracy"]
            entry["teacher"] = per_model["teacher"][i]["accuracy"] if teacher else None
            recall_rows.append(entry)

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
    }


def attach_training(report: dict, model_folder: Path) -> dict:
    """Add the run's per-layer transfer error and stage summary when the model folder holds a run."""
    summary = Path(model_folder) / "run" / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        report["transfer_layer_mse"] = data.get("transfer_layer_mse") or {}
        report["training"] = data.get("stages", [])
    return report
