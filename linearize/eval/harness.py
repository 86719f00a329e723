"""lm-evaluation-harness task definitions that read the same offline documents as `linearize eval`.

`write_harness_tasks(folder)` writes one JSONL file of rendered documents and one YAML task per task, named
`linearize_<task>`; run them with `lm_eval --include_path <folder> --tasks linearize_piqa ...`. Prompts are
stored fully rendered (few-shot examples included), so the harness sees exactly the strings `linearize eval`
scores and both report the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tasks import TASKS, select_docs

_UTILS = '''"""Helpers for the Winogrande-style tasks written by linearize (one context per option)."""


def doc_to_text(doc):
    return doc["gold"]


def doc_to_choice(doc):
    return doc["contexts"]


def doc_to_target(doc):
    return doc["target"]
'''

_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "cloze": ["perplexity", "acc"],
}


def _row(task, doc: dict) -> dict:
    built = task.build(doc)
    if task.kind == "cloze":
        (request,) = built.requests
        return {"query": request.context, "target": request.continuation}
    contexts = {r.context for r in built.requests}
    if len(contexts) > 1:
        target = built.requests[0].continuation.removeprefix(" ")
        return {"contexts": [r.context for r in built.requests], "target": target, "gold": built.gold}
    return {"query": built.requests[0].context, "choices": list(built.choice_texts), "gold": built.gold}


def _yaml(name: str, task, data_file: Path, partial: bool) -> str:
    lines = [
        f"task: linearize_{name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
    ]
    if task.kind == "cloze":
        lines += ["output_type: loglikelihood", 'doc_to_text: "{{query}}"', 'doc_to_target: "{{target}}"']
        metrics = [("perplexity", "perplexity", "false"), ("acc", "mean", "true")]
    else:
        lines.append("output_type: multiple_choice")
        if partial:
            lines += [
                "doc_to_text: !function utils.doc_to_text",
                "doc_to_choice: !function utils.doc_to_choice",
                "doc_to_target: !function utils.doc_to_target",
            ]
        else:
            lines += ['doc_to_text: "{{query}}"', 'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{gold}}"']
        names = ["acc"] if partial else _METRICS["multiple_choice"]
        metrics = [(m, "mean", "true") for m in names]
    lines.append("metric_list:")
    for metric, aggregation, higher in metrics:
        lines += [f"  - metric: {metric}", f"    aggregation: {aggregation}", f"    higher_is_better: {higher}"]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def write_harness_tasks(
    folder: str | Path, tasks: list[str] | None = None, limit: int | None = None, final_folder: str | Path | None = None
) -> list[str]:
    """Write lm-eval task YAMLs and their data into `folder`; returns the task names written.

    The YAMLs name their data files by absolute path inside `final_folder` (default `folder`): where the folder
    will be once it is moved into place.
    """
    folder = Path(folder)
    final = Path(final_folder or folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(_UTILS)
    written = []
    for name in tasks or list(TASKS):
        task = TASKS[name]
        rows = [_row(task, d) for d in select_docs(task, limit)]
        data_file = (final / f"{name}.jsonl").resolve()
        (folder / data_file.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        partial = bool(rows) and "contexts" in rows[0]
        (folder / f"linearize_{name}.yaml").write_text(_yaml(name, task, data_file, partial))
        written.append(f"linearize_{name}")
    return written
