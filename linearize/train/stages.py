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
from .loop import Dist, StageResult, run_stage
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
    data: dict = field(default_factory=dict)

    def data_for(self, stage: StageConfig):
        seq_len = stage.seq_len or self.recipe.data.seq_len
        if seq_len not in self.data:
            self.data[seq_len] = self.load_data(seq_len)
        return self.data[seq_len]


def run_recipe_stage(run: Run, index: int, stage: StageConfig) -> StageResult | None:
    """Run stage `index` of the recipe; None when it has nothing to train (e.g. every layer kept as softmax)."""
    from ..data import BatchPlan

    named = TRAINABLES[stage.trains].setup(run, stage)
    if not named:
        logger.info("%s: nothing to train (%s); skipped", stage.name, stage.trains)
        return None
    objective = OBJECTIVES[stage.objective].build(run, stage)
    data = run.data_for(stage)
    seq_len = data.train.shape[1]
    # Each stage walks its own data order: the run's seed plus the stage's place in the recipe.
    plan = BatchPlan(len(data.train), stage.batch_size, run.recipe.run.seed + index, run.ctx.world, run.ctx.rank)
    steps = plan.steps_for(stage.tokens, seq_len)
    _note_budget(stage.name, stage.tokens)
    per_layer: dict[int, list[float]] = {}

    def step(i: int) -> dict:
        return objective.backward(data.train[plan.indices(i)].to(run.ctx.device))

    def extra() -> dict:
        if not per_layer:
            return {}
        return {"layer_mse": {str(k): sum(v) / len(v) for k, v in sorted(per_layer.items())}}

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
    TRAINABLES[stage.trains].finish(run, named)
    return result


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
