"""One stage of a recipe, as a flat function: set up what trains and the objective, train, save.

`Run` is what the stages of one pipeline run share: the frozen teacher, the student as the stages leave it (the
converted twin, wrapped with LoRA adapters once a stage adds them), the data by sequence length, and where the
run writes. `run_recipe_stage` looks the stage's objective and trainable set up in `train.registry`, and hands
the loop (`loop.run_stage`) one batch's forward and backward per step; checkpoints, resume, the NaN stop and
gradient averaging across processes are the loop's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import LoraSettings, Recipe, StageConfig
from ..errors import LinearizeError
from .loop import Dist, StageResult, run_stage
from .memory import flops_per_token, log_plan, pick_micro_batch, use_checkpointing
from .registry import OBJECTIVES, TRAINABLES

logger = logging.getLogger(__name__)

VAL_SEQUENCES = 16


@dataclass
class Run:
    """What the stages of one run share.

    Attributes:
        recipe: the resolved recipe.
        ctx: this process's place among the run's processes.
        run_dir: `<out>/run`.
        resume: continue from the checkpoints in `run_dir`.
        teacher: the original model, frozen.
        model: the student as the stages leave it.
        load_data: `seq_len -> PackedData`, the run's data packed at that length.
        sharded: the frozen weights are sharded across processes (FSDP).
        lora: the adapters' settings once a stage added them.
        adapters: ids of the adapters' parameters once a stage added them.
        untied: the student holds weights of its own (a stage trains all of them).
        checkpointing: activation checkpointing is on in the current stage (run.gradient_checkpointing resolved
            for it).
    """

    recipe: Recipe
    ctx: Dist
    run_dir: Path
    resume: bool
    teacher: nn.Module
    model: nn.Module
    load_data: Callable
    sharded: bool = False
    lora: LoraSettings | None = None
    adapters: set[int] | None = None
    untied: bool = False
    checkpointing: bool = False
    data: dict = field(default_factory=dict)

    def data_for(self, stage: StageConfig):
        seq_len = stage.seq_len or self.recipe.data.seq_len
        if seq_len not in self.data:
            self.data[seq_len] = self.load_data(seq_len)
        return self.data[seq_len]


def run_recipe_stage(run: Run, index: int, stage: StageConfig) -> StageResult | None:
    """Run stage `index` of the recipe; None when it has nothing to train (e.g. every layer kept as softmax)."""
    from ..data import BatchPlan

    if OBJECTIVES[stage.objective].select is not None:
        return OBJECTIVES[stage.objective].select(run, stage)
    named = TRAINABLES[stage.trains].setup(run, stage)
    if not named:
        logger.info("%s: nothing to train (%s); skipped", stage.name, stage.trains)
        return None
    registered = OBJECTIVES[stage.objective]
    data = run.data_for(stage)
    seq_len = data.train.shape[1]
    run.checkpointing = use_checkpointing(run, stage, named, seq_len, registered.whole_model)
    objective = registered.build(run, stage)
    # Each stage walks its own data order: the run's seed plus the stage's place in the recipe.
    plan = BatchPlan(len(data.train), stage.batch_size, run.recipe.run.seed + index, run.ctx.world, run.ctx.rank)
    steps = plan.steps_for(stage.tokens, seq_len)
    _note_budget(stage.name, stage.tokens)
    micro, memory = pick_micro_batch(run, stage, named, seq_len, registered.whole_model, run.checkpointing)
    if run.ctx.main:
        flops = flops_per_token(run, stage, registered.whole_model, run.checkpointing, stage.trains == "all")
        log_plan(stage.name, memory, micro, stage.batch_size, run.checkpointing, steps * plan.global_batch * seq_len,
                 flops, run.ctx.device)  # fmt: skip
    accumulate = Accumulator(objective, micro, stage, named, run.ctx.device)
    per_layer: dict[int, list[float]] = {}

    def step(i: int) -> dict:
        return accumulate(data.train[plan.indices(i)])

    def extra() -> dict:
        if not per_layer:
            return {}
        return {"layer_mse": {str(k): sum(v) / len(v) for k, v in sorted(per_layer.items())}}

    try:
        result = run_stage(
            stage.name,
            named,
            stage.optim,
            steps,
            plan.global_batch * seq_len,
            step,
            run.run_dir,
            run.recipe.run,
            run.ctx,
            run.resume,
            eval_fn=_evaluator(objective, data.validation, stage.batch_size, run.ctx, per_layer),
            extra_fn=extra,
        )
    except torch.OutOfMemoryError:
        raise LinearizeError(_out_of_memory(run, stage, accumulate.size, seq_len)) from None
    finally:
        objective.close()
    TRAINABLES[stage.trains].finish(run, named)
    return result


class Accumulator:
    """One optimiser step's forward and backward in micro-batches: each micro-batch's loss is scaled by its share
    of the batch, so the summed gradients and the averaged metrics equal those of the whole batch at once.

    With an automatic size on CUDA, a first step that runs out of memory is retried at half the micro-batch."""

    def __init__(self, objective, size: int, stage: StageConfig, named: dict, device: torch.device):
        self.objective, self.size, self.stage, self.named, self.device = objective, size, stage, named, device
        self.may_shrink = stage.micro_batch_size == 0 and device.type == "cuda"

    def __call__(self, batch: torch.Tensor) -> dict:
        while True:
            try:
                metrics = self._run(batch)
                self.may_shrink = False
                return metrics
            except torch.OutOfMemoryError:
                smaller = max((d for d in range(1, self.size // 2 + 1) if len(batch) % d == 0), default=0)
                if not self.may_shrink or smaller == 0:
                    raise
            # Outside the handler: its traceback no longer holds the failed attempt's tensors.
            for p in self.named.values():
                p.grad = None
            torch.cuda.empty_cache()
            logger.warning("%s: out of memory at micro-batch %d; trying %d", self.stage.name, self.size, smaller)
            self.size = smaller

    def _run(self, batch: torch.Tensor) -> dict:
        totals: dict = {}
        for start in range(0, len(batch), self.size):
            part = batch[start : start + self.size]
            share = len(part) / len(batch)
            metrics = self.objective.backward(part.to(self.device), scale=share)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + share * float(value)
        return totals


def _out_of_memory(run: Run, stage: StageConfig, micro: int, seq_len: int) -> str:
    from .runfolder import has_checkpoint

    state = run.run_dir / "checkpoints" / stage.name / "state.pt"
    if state.is_file():
        kept = str(state)
    elif has_checkpoint(run.run_dir):
        kept = f"the finished stages' results in {run.run_dir / 'checkpoints'}"
    else:
        kept = "none yet"
    changes = [f"--set {stage.name}.micro_batch_size={max(1, micro // 2)}"] if micro > 1 else []
    if not run.checkpointing:
        changes.append("--set run.gradient_checkpointing=true")
    again = ", then rerun with --resume" if kept != "none yet" else ""
    length = f"{stage.name}.seq_len" if stage.seq_len else "data.seq_len"
    return (
        f"stage {stage.name} ran out of GPU memory at micro-batch {micro} of {stage.batch_size} sequences of "
        f"{seq_len} tokens (gradient checkpointing {'on' if run.checkpointing else 'off'}); try "
        f"{' or '.join(changes) or 'a GPU with more memory'}{again}, or a new run with a shorter --set {length}=<n>; "
        f"last checkpoint kept: {kept}"
    )


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


def _note_budget(stage: str, tokens: int) -> None:
    if tokens < 1_000_000:
        logger.info(
            "%s: %s tokens is a quick run; LoLCATs uses about 20M per stage (--set %s.tokens=20e6)",
            stage,
            f"{tokens:,}",
            stage,
        )
