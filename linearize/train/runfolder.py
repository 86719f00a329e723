"""The output folder of a training run: guarded, resumable, replaced only when the new run is complete.

`guard_run` wraps the pipeline: before any work it checks the output folder (`linearize.outdir.check_output`),
the teacher's architecture and position limit (from config.json, without loading weights); with `--overwrite`
the new run goes into a hidden sibling folder that replaces the old output only when the run has finished (an
interrupted one continues there with `--resume`); a run that fails before its first checkpoint leaves nothing
behind, so the corrected command needs no `--overwrite`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import yaml

from .. import outdir
from ..config import Recipe, from_dict, to_dict
from ..errors import LinearizeError, first_line

logger = logging.getLogger(__name__)

RUN_DIR = "run"
RECIPE = "recipe.yaml"
# More passes over the training text than this is a mistyped budget, not a plan.
MAX_EPOCHS = 1000


def model_identity(source: str) -> str:
    """What a run records of its teacher to check `--resume`: a local path resolved, else the name as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _flat(data: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested recipe dict; stages are keyed by their name, as `--set` names them
    (`finetune.optim.lr`)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif key == "stages" and not prefix and isinstance(value, list):
            for stage in value:
                out.update(_flat(stage, f"{stage.get('name')}."))
            out["stages"] = [stage.get("name") for stage in value]
        else:
            out[f"{prefix}{key}"] = value
    return out


# Settings that change memory and speed, never the result: free to change on resume (the OOM advice needs this).
MEMORY_SETTINGS = ("run.gradient_checkpointing",)
STAGE_MEMORY_SETTINGS = ("micro_batch_size",)


def _resumable_change(key: str, run_dir: Path) -> bool:
    if key in MEMORY_SETTINGS:
        return True
    # Optimiser settings of a stage that has not finished may change on resume (the NaN-stop advice needs this).
    stage, _, rest = key.partition(".")
    if rest in STAGE_MEMORY_SETTINGS:
        return True
    return rest.startswith("optim.") and not (run_dir / "checkpoints" / stage / "final.pt").is_file()


def prepare_run(out: Path, recipe: Recipe, model: str, resume: bool) -> Path:
    """Create `out/run` for a new run, or check that the run there can be resumed with this model and recipe."""
    out = Path(out)
    run_dir = out / RUN_DIR
    recipe_path = run_dir / RECIPE
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        outdir.write_marker(out, "model", model=model_identity(model))
        outdir.write_marker(run_dir, "run")
        recipe_path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        return run_dir
    if not recipe_path.is_file():
        raise LinearizeError(f"--resume: {out} holds no run to resume (no {RUN_DIR}/{RECIPE}); drop --resume")
    recorded = (outdir.read_marker(out) or {}).get("model")
    if recorded is not None and recorded != model_identity(model):
        raise LinearizeError(
            f"--resume: the run in {out} was made with --model {recorded}, not {model}; resume with the same "
            "--model, or start a new run in another --out"
        )
    try:
        saved = from_dict(Recipe, yaml.safe_load(recipe_path.read_text()) or {})
    except (LinearizeError, yaml.YAMLError) as exc:
        raise LinearizeError(f"--resume: {recipe_path} is damaged ({first_line(exc)[:120]}); start over with "
                             "--overwrite") from None  # fmt: skip
    old, new = _flat(to_dict(saved)), _flat(to_dict(recipe))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = [k for k in changed if not _resumable_change(k, run_dir)]
    if refused:
        raise LinearizeError(
            f"--resume: the recipe differs from the run in {out} ({', '.join(refused[:4])}); resume with the same "
            "recipe and --set values (only the optimiser settings of an unfinished stage, micro_batch_size and "
            "run.gradient_checkpointing may change), or start a "
            "new run in another --out"
        )
    if changed:
        logger.warning("--resume with new settings: %s", ", ".join(f"{k}={new.get(k)}" for k in changed))
        recipe_path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return run_dir


def check_budgets(recipe: Recipe, train_tokens: int) -> None:
    """Refuse token budgets that would pass over the training text more than `MAX_EPOCHS` times."""
    for stage in recipe.stages:
        if not stage.enabled or train_tokens <= 0:
            continue
        epochs = stage.tokens / train_tokens
        if epochs > MAX_EPOCHS:
            raise LinearizeError(
                f"{stage.name}.tokens={stage.tokens:,} is {epochs:,.0f} passes over the {train_tokens:,} training "
                f"tokens: lower {stage.name}.tokens or give more text (data.dataset)"
            )
        if epochs > 20:
            logger.warning("%s: %s tokens is %.0f passes over the training text; it may overfit", stage.name,
                           f"{stage.tokens:,}", epochs)  # fmt: skip


def has_checkpoint(run_dir: Path) -> bool:
    """True once any checkpoint of the run exists (from then on a failed run is kept for --resume)."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(folder.rglob("*.pt"))


def _remove_failed_start(work: Path, existed: bool) -> None:
    """Remove what a run that failed before its first checkpoint wrote (the folder itself if it made it)."""
    if not work.exists() or has_checkpoint(work / RUN_DIR):
        return
    if existed:
        for path in list(work.iterdir()):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        outdir.discard(work)


def guard_run(run):
    """Wrap `run_pipeline(model, recipe, out, resume, overwrite)` with the output-folder rules above."""

    @functools.wraps(run)
    def guarded(model: str, recipe: Recipe, out, resume: bool = False, overwrite: bool = False, **kwargs):
        from ..models.loading import check_convertible

        if not str(out).strip():
            raise LinearizeError("--out is empty: name the output folder")
        out = Path(out).expanduser()
        main = int(os.environ.get("RANK", "0")) == 0
        staging = outdir.staging_folder(out)
        inputs = [model, recipe.data.dataset]
        if resume and not overwrite and (staging / RUN_DIR / RECIPE).is_file():
            # An interrupted --overwrite run continues beside the old output it will replace.
            state, work = "resume", staging
        elif not main:
            # The main process checks and prepares the folder; the others only follow its decision.
            state = "resume" if resume else "new"
            work = staging if overwrite else out
        else:
            hint = "pass --resume to continue its run, "
            state = outdir.check_output(out, "model", overwrite, resume, inputs, hint=hint)
            work = staging if state == "replace" else out
        check_convertible(model, recipe.data.seq_len)
        if main and state == "replace" and staging.parent.exists():
            outdir.discard(staging)
        existed = work.exists()
        try:
            result = run(model, recipe, work, resume=state == "resume", overwrite=False, **kwargs)
        except BaseException:
            if main and state != "resume":
                _remove_failed_start(work, existed)
            raise
        if main and work != out:
            outdir.publish(work, out)
            if result.summary and result.summary.get("report"):
                result.summary["report"] = str(out / Path(result.summary["report"]).relative_to(work))
        result.out = out
        return result

    return guarded
