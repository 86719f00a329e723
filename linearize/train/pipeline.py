"""The job users come for: load, convert, run the recipe's stages (attention transfer, LoRA fine-tuning, ...),
merge, export, report.

Layout of the output folder `<out>`:

    <out>/config.json, model.safetensors, ...   the exported model (a normal Hugging Face folder)
    <out>/run/recipe.yaml                       the resolved recipe (after --set)
    <out>/run/metrics.jsonl                     one JSON line per logged step
    <out>/run/log.txt                           the run's log
    <out>/run/checkpoints/<stage>/              atomic checkpoints (state.pt while running, final.pt when done)
    <out>/run/summary.json                      what was trained: stages, tokens, losses, per-layer transfer error;
                                                "finished": true once the export and the report are written
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import AttentionConfig, Recipe, from_dict
from ..errors import LinearizeError
from .loop import Dist
from .runfolder import RUN_DIR, check_budgets, guard_run

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    out: Path
    summary: dict


def _prepare_out(out: Path, recipe: Recipe, resume: bool, model: str) -> Path:
    from .runfolder import prepare_run

    return prepare_run(out, recipe, model, resume)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _resolve_dtype(name: str, ctx: Dist) -> str:
    if name != "auto":
        return name
    if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _load_data(recipe: Recipe, tokenizer, run_dir: Path, ctx: Dist, seq_len: int | None = None):
    from ..data import PackedData, load_documents, pack_documents

    # A stage with a sequence length of its own (e.g. a long-context stage) gets its own packing.
    seq_len = seq_len or recipe.data.seq_len
    path = run_dir / ("data.pt" if seq_len == recipe.data.seq_len else f"data-{seq_len}.pt")
    if ctx.main and not path.is_file():
        docs, where = load_documents(recipe.data, tokenizer)
        sequences = pack_documents(docs, tokenizer, seq_len)
        packed = PackedData.split(sequences, recipe.data.validation_fraction, recipe.run.seed, where)
        from .checkpoint import atomic_save

        atomic_save(packed.__dict__, path)
    ctx.barrier()
    from .checkpoint import load_checkpoint

    return PackedData(**load_checkpoint(path, "the packed training data"))


def _export(student, tokenizer, out: Path, recipe: Recipe, source: str, compute_dtype: str) -> None:
    """Write the model files into `out` through a temporary folder; config.json lands last."""
    from ..models.export import export_dtype, save_converted

    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        dtype = export_dtype(recipe.run.export_dtype, source, compute_dtype)
        logger.info("export: writing the weights in %s", str(dtype).removeprefix("torch."))
        save_converted(student, tokenizer, tmp, recipe, dtype=dtype)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finished_summary(run_dir: Path) -> dict | None:
    """The summary of a run that got to its end (export and report written), else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("finished") else None


@guard_run
def run_pipeline(
    model: str,
    recipe: Recipe,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
) -> PipelineResult:
    """Run the recipe's stages in order and export the converted model into `out`.

    Args:
        model: alias, local folder, .gguf file or Hub id of the teacher.
        recipe: the resolved recipe.
        out: output folder (model files at its top, the run's files under `run/`).
        resume: continue the run already in `out` from its last checkpoint; a finished run is left as it is.
        overwrite: start over in a non-empty `out`.
    """
    from ..attention import converted_modules
    from ..models.convert import convert
    from ..models.export import public_name
    from ..models.loading import load_model
    from ..models.twin import shallow_twin
    from .stages import Run, run_recipe_stage

    ctx = _dist_context()
    out = Path(out)
    run_dir = _prepare_out(out, recipe, resume, model) if ctx.main else out / RUN_DIR
    ctx.barrier()
    finished = _finished_summary(run_dir) if resume else None
    if finished is not None:
        logger.info(
            "the run in %s is finished; nothing to do (--overwrite trains it again, `linearize eval --model %s` "
            "evaluates it again)",
            out,
            out,
        )
        return PipelineResult(out=out, summary=finished)
    log_handler = _attach_log(run_dir) if ctx.main else None
    started = time.perf_counter()
    try:
        _seed_everything(recipe.run.seed)
        dtype = _resolve_dtype(recipe.run.dtype, ctx)
        loaded = load_model(model, dtype=dtype)
        if loaded.tokenizer is None:
            raise LinearizeError(f"{model} has no tokenizer: the pipeline needs one to prepare training text")
        teacher = loaded.model.to(ctx.device).eval()
        teacher.requires_grad_(False)
        sharded = recipe.run.fsdp and ctx.world > 1
        if sharded:
            from .distributed import shard_frozen_weights

            n_units = shard_frozen_weights(teacher, ctx.device)
            logger.info("fsdp: frozen weights sharded across %d processes (%d units)", ctx.world, n_units)
        student = shallow_twin(teacher)
        convert(student, recipe.attention, base_model=public_name(model))
        for module in converted_modules(student).values():
            module.float_new_parameters()
        data = _load_data(recipe, loaded.tokenizer, run_dir, ctx)
        logger.info(
            "data: %s; %d training and %d validation sequences of %d tokens",
            data.source,
            len(data.train),
            len(data.validation),
            data.train.shape[1],
        )
        check_budgets(recipe, data.train.numel())
        run = Run(
            recipe,
            ctx,
            run_dir,
            resume,
            teacher,
            student,
            lambda seq_len: _load_data(recipe, loaded.tokenizer, run_dir, ctx, seq_len),
            sharded=sharded,
            data={recipe.data.seq_len: data},
        )
        results, stage_seconds = [], 0.0
        for index, stage in enumerate(recipe.stages):
            if not stage.enabled:
                continue
            stage_started = time.perf_counter()
            result = run_recipe_stage(run, index, stage)
            stage_seconds += time.perf_counter() - stage_started
            if result is not None:
                results.append(result)
        final_model = _final_model(run, model, dtype)
        summary = {
            "model": public_name(model),
            "recipe": recipe.name,
            "attention": recipe.attention.kind,
            "data": data.source,
            "seq_len": data.train.shape[1],
            "world_size": ctx.world,
            "dtype": dtype,
            "stages": [r.__dict__ for r in results],
            "transfer_layer_mse": next((r.extra["layer_mse"] for r in results if "layer_mse" in r.extra), {}),
            # What that per-layer error compares: the objective of the stage that measured it.
            "transfer_objective": next(
                (recipe.stage(r.name).objective for r in results if "layer_mse" in r.extra), None
            ),
            # Stages count the time earlier processes of a resumed run spent in them.
            "seconds": round(sum(r.seconds for r in results) + time.perf_counter() - started - stage_seconds, 1),
        }
        if ctx.main:
            _export(final_model, loaded.tokenizer, out, recipe, model, dtype)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            del teacher, student, final_model, run
            if recipe.report.enabled:
                summary["report"] = str(_write_run_report(model, out, recipe, data, dtype, ctx))
            summary["finished"] = True
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        ctx.barrier()
        return PipelineResult(out=out, summary=summary)
    finally:
        if log_handler is not None:
            logging.getLogger("linearize").removeHandler(log_handler)
            log_handler.close()


def _final_model(run, source: str, dtype: str):
    """The trained student with its adapters merged, gathered onto the main process when sharded (None
    elsewhere)."""
    if run.sharded:
        final = _rebuild_unsharded(run.model, source, dtype, run.recipe, run.lora, run.ctx)
    else:
        final = run.model.merge_and_unload() if run.lora is not None else run.model
    if final is not None:
        final.eval()
    return final


def _write_run_report(source: str, out: Path, recipe: Recipe, data, dtype: str, ctx: Dist) -> Path:
    """Evaluate the exported model (reloaded from disk) against a fresh copy of the teacher."""
    from ..eval.perplexity import perplexity_of_sequences
    from ..eval.report import write_report
    from ..eval.runner import EvalSettings, attach_training, evaluate
    from ..models.export import public_name
    from ..models.loading import load_model

    cfg = recipe.report
    seq_len = data.train.shape[1]
    student = load_model(str(out), dtype=dtype)
    teacher = load_model(source, dtype=dtype)
    student.model.to(ctx.device)
    teacher.model.to(ctx.device)
    positions = getattr(teacher.model.config, "max_position_embeddings", None) or 4 * seq_len
    context_lengths = [n for n in cfg.context_lengths or [seq_len, 2 * seq_len, 4 * seq_len] if n <= positions]
    long_ppl = [f"ppl:{cfg.long_context_source}"] if cfg.long_context_source and context_lengths else []
    settings = EvalSettings(
        tasks=list(cfg.tasks) + long_ppl,
        limit=cfg.limit,
        passkey_lengths=cfg.passkey_lengths or [seq_len, 2 * seq_len],
        efficiency_lengths=list(cfg.efficiency_lengths),
        controls=cfg.controls,
        context_lengths=context_lengths if long_ppl else [],
        ppl_docs=cfg.long_context_docs,
        long_controls=False,
    )
    logger.info("report: evaluating the exported model against %s (limit %s per task)", source, cfg.limit)
    report = evaluate(
        student.model,
        student.tokenizer,
        settings,
        teacher=teacher.model,
        teacher_tokenizer=teacher.tokenizer,
        student_name=public_name(str(out)),
        teacher_name=public_name(source),
    )
    if len(data.validation):
        from .stages import VAL_SEQUENCES

        held_out = data.validation[:VAL_SEQUENCES]
        rows = {
            who: perplexity_of_sequences(m, student.tokenizer, held_out)
            for who, m in (("student", student.model), ("teacher", teacher.model))
        }
        report["perplexity"].insert(
            0,
            {
                "source": f"held-out validation split of the training data ({data.source})",
                "tokens": rows["student"]["tokens"],
                "student": rows["student"]["perplexity"],
                "student_bpb": rows["student"]["bits_per_byte"],
                "teacher": rows["teacher"]["perplexity"],
                "teacher_bpb": rows["teacher"]["bits_per_byte"],
                "ratio": rows["student"]["perplexity"] / rows["teacher"]["perplexity"],
            },
        )
    attach_training(report, out)
    return write_report(report, out / "report")


def _rebuild_unsharded(trained, source: str, dtype: str, recipe: Recipe, lora, ctx: Dist):
    """Gather the sharded weights and rebuild a plain merged model on the main process (None elsewhere)."""
    from ..attention import converted_modules
    from ..models.convert import convert
    from ..models.export import public_name
    from ..models.loading import load_model
    from .distributed import full_state_dict
    from .finetune import add_lora

    state = full_state_dict(trained)
    if not ctx.main:
        return None
    # The layers and heads chosen at conversion, not the recipe's budgets: choosing again could choose otherwise.
    settings = trained.config.linearize
    fresh = load_model(source, dtype=dtype).model
    convert(fresh, from_dict(AttentionConfig, settings["attention"]), base_model=public_name(source))
    if "selection" in settings:
        fresh.config.linearize["selection"] = settings["selection"]
    for module in converted_modules(fresh).values():
        module.float_new_parameters()
    if lora is not None:
        fresh = add_lora(fresh, lora)
    fresh.load_state_dict(state, strict=True)
    return fresh.merge_and_unload() if lora is not None else fresh


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("linearize")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def _dist_context() -> Dist:
    """One process, or the process group that `accelerate launch` or torchrun describe in the environment."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist.current()
