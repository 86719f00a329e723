"""The two jobs as Python functions: `train` (the main job) and `evaluate` (the recovery report).

The `linearize train` and `linearize eval` commands call these same functions. Heavy imports (torch, transformers)
happen inside them, so `import linearize` stays quick.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LinearizeError

logger = logging.getLogger(__name__)

DEFAULT_TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande"


@dataclass
class Evaluation:
    """What `evaluate` wrote: the report as a dict (as in report.json) and the path of report.md."""

    report: dict
    path: Path


def train(
    model: str = "smollm2-135m",
    recipe: str | Path = "lolcats",
    out: str | Path = "out/smol",
    overrides: Mapping[str, object] | Iterable[str] = (),
    resume: bool = False,
    overwrite: bool = False,
):
    """Convert `model` to linear attention, train it by `recipe`, export it into `out` and write its report.

    Args:
        model: alias (`linearize models`), local folder, .gguf file or Hub id of the teacher.
        recipe: bundled recipe name (`linearize recipes`) or path to a YAML recipe.
        out: output folder: the exported model at its top, the run under `run/`, the report under `report/`.
        overrides: recipe settings to change, as {"transfer.tokens": 2e6} or ["transfer.tokens=2e6"]
            (the CLI's `--set`).
        resume: continue the interrupted run in `out`; a finished run is left as it is.
        overwrite: start over in a non-empty `out`.

    Returns:
        A `PipelineResult`: `out` and `summary` (stages, losses, per-layer transfer error, report path).
    """
    from .config import load_recipe
    from .train.pipeline import run_pipeline

    resolved = load_recipe(recipe, _settings(overrides))
    return run_pipeline(model, resolved, out, resume=resume, overwrite=overwrite)


def evaluate(
    model: str,
    teacher: str | None = None,
    tasks: str | Iterable[str] = DEFAULT_TASKS,
    limit: int | str | None = None,
    out: str | Path | None = None,
    dtype: str = "auto",
    device: str | None = None,
    compare: Mapping[str, str] | Iterable[str] = (),
    sparse_cache: int = 0,
    sparse_block: int | None = None,
    **options,
) -> Evaluation:
    """Score `model` (and its `teacher`) and write the accuracy-recovery report.

    Args:
        model: the converted model: a folder written by `train` or `convert`, or any model `train` accepts.
        teacher: the original model, for the recovery figures (None: scores of `model` only).
        tasks: task names, comma-separated or as a list (see `linearize eval --help`).
        limit: documents per task (MMLU: per subject), e.g. 100 or "1000,mmlu=20"; None: all.
        out: report folder (default: `<model>/report` for a folder, else `report`).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: e.g. "cuda" (default: CPU).
        compare: other models scored on the same tasks, as {"no-transfer": "out/smol-notransfer"} or
            ["no-transfer=out/smol-notransfer"].
        sparse_cache: K > 0 evaluates `model` and every `compare` model whose kind takes it (lolcats) with a sparse
            cache of K past pairs per key/value head kept exact beside the window (LoLA; no retraining).
        sparse_block: tokens between updates of the kept pairs (None: the window).
        **options: further `EvalSettings` fields, e.g. batch_size=8, passkey_lengths=[512], controls=False.

    Returns:
        An `Evaluation`: the report dict and the path of report.md (report.json and plots beside it).
    """
    import dataclasses

    from .eval.report import write_report
    from .eval.runner import EvalSettings, attach_training, parse_limit, parse_tasks
    from .eval.runner import evaluate as run_evaluation
    from .models.export import public_name
    from .models.loading import load_model
    from .outdir import check_output, write_marker

    default_limit, task_limits = parse_limit(None if limit is None else str(limit))
    known = {f.name for f in dataclasses.fields(EvalSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LinearizeError(f"evaluate() got unknown options {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    task_list = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    settings = EvalSettings(tasks=task_list, limit=default_limit, task_limits=task_limits, **options)
    _check_settings(settings)
    pairs = _pairs(compare)
    folder = Path(out) if out else (Path(model) / "report" if Path(model).is_dir() else Path("report"))
    # A report goes into a new or empty folder, or over an earlier report; never over other files.
    check_output(folder, "report", overwrite=True)
    student = load_model(model, dtype=dtype, device=device)
    if student.tokenizer is None:
        raise LinearizeError(f"{model} has no tokenizer files: evaluation needs one")
    sparse = _apply_sparse_cache(student.model, public_name(model), sparse_cache, sparse_block, required=True)
    other = load_model(teacher, dtype=dtype, device=device) if teacher else None
    extra = []
    for name, path in pairs:
        loaded = load_model(path, dtype=dtype, device=device)
        sparse += _apply_sparse_cache(loaded.model, name, sparse_cache, sparse_block, required=False)
        extra.append((name, loaded.model, loaded.tokenizer or student.tokenizer))
    report = run_evaluation(
        student.model,
        student.tokenizer,
        settings,
        teacher=other.model if other else None,
        teacher_tokenizer=other.tokenizer if other else None,
        # Reports travel (push uploads them): local models are named by their folder or file name only.
        student_name=public_name(model),
        teacher_name=public_name(teacher) if teacher else None,
        compare=extra,
    )
    attach_training(report, Path(model))
    if sparse:
        report["sparse_cache"] = {"pairs": sparse_cache, "block": sparse_block, "models": sparse}
    path = write_report(report, folder)
    write_marker(folder, "report")
    return Evaluation(report=report, path=path)


def _apply_sparse_cache(model, name: str, cache_size: int, block: int | None, required: bool) -> list[str]:
    """Switch the sparse cache on in a loaded model; returns [name] where it was, [] where it was not asked for
    or (`required` False) the model's kind does not take it."""
    from .attention.sparse_cache import set_sparse_cache, takes_sparse_cache

    if not cache_size:
        if block is not None:
            raise LinearizeError("--sparse-block is set without --sparse-cache: give the cache a size, e.g. 64")
        return []
    if not required and not takes_sparse_cache(model):
        logger.info("%s takes no sparse cache: evaluated as it is", name)
        return []
    set_sparse_cache(model, cache_size, block, name=name)
    return [name]


def _settings(overrides: Mapping[str, object] | Iterable[str]) -> list[str]:
    """Recipe overrides as `--set` items; a mapping's non-string values are written as JSON (which YAML reads)."""
    if isinstance(overrides, Mapping):
        return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise LinearizeError(f"overrides takes a dict or a list of KEY=VALUE strings, got the string '{overrides}'")
    return list(overrides)


def _pairs(compare: Mapping[str, str] | Iterable[str]) -> list[tuple[str, str]]:
    if isinstance(compare, Mapping):
        return [(str(name), str(path)) for name, path in compare.items()]
    pairs = []
    for item in compare:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise LinearizeError(f"--compare takes NAME=MODEL (e.g. no-transfer=out/smol-notransfer), got '{item}'")
        pairs.append((name, path))
    return pairs


def _check_settings(settings) -> None:
    for name in ("batch_size", "passkey_trials", "ppl_window"):
        value = getattr(settings, name)
        if value <= 0:
            raise LinearizeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if any(n <= 0 for n in (*settings.context_lengths, *settings.qa_lengths, *settings.niah_lengths)):
        raise LinearizeError("--context-lengths, --qa-lengths and --niah-lengths take positive token counts")
    if any(not 0.0 <= d <= 1.0 for d in settings.qa_depths):
        raise LinearizeError(f"--qa-depths are fractions between 0 and 1, got {settings.qa_depths}")
    if settings.qa_lengths and not settings.qa_depths:
        raise LinearizeError("--qa-lengths needs at least one --qa-depths value")
