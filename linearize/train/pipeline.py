"""The job users come for: load, convert, attention transfer, LoRA fine-tuning, merge, export.

Layout of the output folder `<out>`:

    <out>/config.json, model.safetensors, ...   the exported model (a normal Hugging Face folder)
    <out>/run/recipe.yaml                       the resolved recipe (after --set)
    <out>/run/metrics.jsonl                     one JSON line per logged step
    <out>/run/log.txt                           the run's log
    <out>/run/checkpoints/<stage>/              atomic checkpoints (state.pt while running, final.pt when done)
    <out>/run/summary.json                      what was trained: stages, tokens, losses, per-layer transfer error
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
import yaml

from ..config import Recipe, from_dict, to_dict
from ..errors import LinearizeError
from .loop import Dist, StageResult, run_stage

logger = logging.getLogger(__name__)

RUN_DIR = "run"
VAL_SEQUENCES = 16


@dataclass
class PipelineResult:
    out: Path
    summary: dict


def _prepare_out(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    run_dir = out / RUN_DIR
    recipe_path = run_dir / "recipe.yaml"
    if resume:
        if not recipe_path.is_file():
            raise LinearizeError(f"--resume: {out} holds no run to resume (no {RUN_DIR}/recipe.yaml); drop --resume")
        saved = from_dict(Recipe, yaml.safe_load(recipe_path.read_text()))
        if to_dict(saved) != to_dict(recipe):
            diff = [k for k in to_dict(recipe) if to_dict(recipe)[k] != to_dict(saved)[k]]
            raise LinearizeError(
                f"--resume: the recipe differs from the run in {out} (sections: {', '.join(diff)}); resume with the "
                "same recipe and --set values, or start a new run in another --out"
            )
        return run_dir
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LinearizeError(
                f"--out {out} already exists and is not empty: pass --resume to continue its run, --overwrite to "
                "start over, or choose another folder"
            )
        shutil.rmtree(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return run_dir


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _resolve_dtype(name: str, ctx: Dist) -> str:
    if name != "auto":
        return name
    if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _load_data(recipe: Recipe, tokenizer, run_dir: Path, ctx: Dist):
    from ..data import PackedData, load_documents, pack_documents

    path = run_dir / "data.pt"
    if ctx.main and not path.is_file():
        docs, where = load_documents(recipe.data, tokenizer)
        sequences = pack_documents(docs, tokenizer, recipe.data.seq_len)
        packed = PackedData.split(sequences, recipe.data.validation_fraction, recipe.run.seed, where)
        from .checkpoint import atomic_save

        atomic_save(packed.__dict__, path)
    ctx.barrier()
    return PackedData(**torch.load(path, map_location="cpu", weights_only=False))


def _export(student, tokenizer, out: Path, recipe: Recipe) -> None:
    """Write the model files into `out` through a temporary folder; config.json lands last."""
    from ..models.export import save_converted

    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        save_converted(student, tokenizer, tmp, recipe)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _batches(data: torch.Tensor, plan, device):
    def get(step: int) -> torch.Tensor:
        return data[plan.indices(step)].to(device)

    return get


def _evaluator(objective, data: torch.Tensor, batch_size: int, ctx: Dist, per_layer: dict | None = None):
    val = data[:VAL_SEQUENCES]

    def evaluate() -> float | None:
        if len(val) == 0:
            return None
        totals = []
        for start in range(0, len(val), batch_size):
            result = objective.evaluate(val[start : start + batch_size].to(ctx.device))
            if isinstance(result, tuple):
                result, layers = result
                if per_layer is not None:
                    for idx, mse in layers.items():
                        per_layer.setdefault(idx, []).append(mse)
            totals.append(result)
        return ctx.mean_scalar(sum(totals) / len(totals))

    return evaluate


def run_pipeline(
    model: str,
    recipe: Recipe,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
) -> PipelineResult:
    """Run both stages and export the converted model into `out`.

    Args:
        model: alias, local folder, .gguf file or Hub id of the teacher.
        recipe: the resolved recipe.
        out: output folder (model files at its top, the run's files under `run/`).
        resume: continue the run already in `out` from its last checkpoint.
        overwrite: start over in a non-empty `out`.
    """
    from ..data import BatchPlan
    from ..models.convert import convert
    from ..models.loading import load_model
    from ..models.twin import shallow_twin
    from .finetune import FinetuneObjective, add_lora, trainable_parameters
    from .transfer import TransferObjective, student_attention_modules

    ctx = _dist_context()
    out = Path(out)
    run_dir = _prepare_out(out, recipe, resume, overwrite) if ctx.main else out / RUN_DIR
    ctx.barrier()
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
        convert(student, recipe.attention, base_model=model)
        students = student_attention_modules(student)
        for module in students.values():
            module.float_new_parameters()
        data = _load_data(recipe, loaded.tokenizer, run_dir, ctx)
        seq_len = data.train.shape[1]
        logger.info(
            "data: %s; %d training and %d validation sequences of %d tokens",
            data.source,
            len(data.train),
            len(data.validation),
            seq_len,
        )

        results: list[StageResult] = []
        transfer_layers: dict[int, list[float]] = {}
        if recipe.transfer.enabled and students:
            cfg = recipe.transfer
            named = {
                f"layers.{idx}.{name}": p
                for idx, m in students.items()
                for name, p in m.named_parameters()
                if name.startswith(("feature_map", "window_factors"))
            }
            for p in named.values():
                p.requires_grad_(True)
            objective = TransferObjective(teacher, students, cfg)
            plan = BatchPlan(len(data.train), cfg.batch_size, recipe.run.seed, ctx.world, ctx.rank)
            steps = plan.steps_for(cfg.tokens, seq_len)
            batch = _batches(data.train, plan, ctx.device)
            _note_budget("transfer", cfg.tokens)
            results.append(
                run_stage(
                    "transfer",
                    named,
                    cfg.optim,
                    steps,
                    plan.global_batch * seq_len,
                    lambda step: objective.backward(batch(step)),
                    run_dir,
                    recipe.run,
                    ctx,
                    resume,
                    eval_fn=_evaluator(objective, data.validation, cfg.batch_size, ctx, transfer_layers),
                )
            )
            for p in named.values():
                p.requires_grad_(False)

        trained = student
        if recipe.finetune.enabled:
            cfg = recipe.finetune
            peft_model = add_lora(student, cfg)
            named = trainable_parameters(peft_model)
            objective = FinetuneObjective(peft_model, teacher if cfg.kd_weight > 0 else None, cfg)
            plan = BatchPlan(len(data.train), cfg.batch_size, recipe.run.seed + 1, ctx.world, ctx.rank)
            steps = plan.steps_for(cfg.tokens, seq_len)
            batch = _batches(data.train, plan, ctx.device)
            _note_budget("finetune", cfg.tokens)
            peft_model.train()
            results.append(
                run_stage(
                    "finetune",
                    named,
                    cfg.optim,
                    steps,
                    plan.global_batch * seq_len,
                    lambda step: objective.backward(batch(step)),
                    run_dir,
                    recipe.run,
                    ctx,
                    resume,
                    eval_fn=_evaluator(objective, data.validation, cfg.batch_size, ctx),
                )
            )
            trained = peft_model
        if sharded:
            final_model = _rebuild_unsharded(trained, model, dtype, recipe, ctx)
        else:
            final_model = trained.merge_and_unload() if recipe.finetune.enabled else trained
        if final_model is not None:
            final_model.eval()

        summary = {
            "model": model,
            "recipe": recipe.name,
            "attention": recipe.attention.kind,
            "data": data.source,
            "seq_len": seq_len,
            "world_size": ctx.world,
            "dtype": dtype,
            "stages": [r.__dict__ for r in results],
            "transfer_layer_mse": {str(k): sum(v) / len(v) for k, v in sorted(transfer_layers.items())},
            "seconds": round(time.perf_counter() - started, 1),
        }
        if ctx.main:
            _export(final_model, loaded.tokenizer, out, recipe)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            del teacher, student, final_model, trained
            if recipe.report.enabled:
                summary["report"] = str(_write_run_report(model, out, recipe, data, dtype, ctx))
        ctx.barrier()
        return PipelineResult(out=out, summary=summary)
    finally:
        if log_handler is not None:
            logging.getLogger("linearize").removeHandler(log_handler)
            log_handler.close()


def _write_run_report(source: str, out: Path, recipe: Recipe, data, dtype: str, ctx: Dist) -> Path:
    """Evaluate the exported model (reloaded from disk) against a fresh copy of the teacher."""
    from ..eval.perplexity import perplexity_of_sequences
    from ..eval.report import write_report
    from ..eval.runner import EvalSettings, attach_training, evaluate
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
        passkey_lengths=cfg.passkey_lengths or [seq_len, 2 * seq_len, 4 * seq_len],
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
        student_name=str(out),
        teacher_name=source,
    )
    if len(data.validation):
        rows = {
            who: perplexity_of_sequences(m, student.tokenizer, data.validation)
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


def _rebuild_unsharded(trained, source: str, dtype: str, recipe: Recipe, ctx: Dist):
    """Gather the sharded weights and rebuild a plain merged model on the main process (None elsewhere)."""
    from ..models.convert import convert
    from ..models.loading import load_model
    from .distributed import full_state_dict
    from .finetune import add_lora
    from .transfer import student_attention_modules

    state = full_state_dict(trained)
    if not ctx.main:
        return None
    fresh = load_model(source, dtype=dtype).model
    convert(fresh, recipe.attention, base_model=source)
    for module in student_attention_modules(fresh).values():
        module.float_new_parameters()
    if recipe.finetune.enabled:
        fresh = add_lora(fresh, recipe.finetune)
    fresh.load_state_dict(state, strict=True)
    return fresh.merge_and_unload() if recipe.finetune.enabled else fresh


def _note_budget(stage: str, tokens: int) -> None:
    if tokens < 1_000_000:
        logger.info(
            "%s: %s tokens is a quick run; LoLCATs uses about 20M per stage (--set %s.tokens=20e6)",
            stage,
            f"{tokens:,}",
            stage,
        )


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
