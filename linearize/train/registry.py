"""What a stage can optimise (objectives) and what it can train (trainable sets), by the names recipes use.

A stage of a recipe names one of each (`objective: attention_output`, `trains: attention`); the pipeline looks
them up here and never branches on the names. An objective builds the object whose `backward(input_ids)` runs
one batch's forward and backward and returns its metrics, and whose `evaluate(input_ids)` gives the validation
loss (with per-layer errors where it has them). A trainable set prepares the model (adding LoRA adapters, untying
weights from the teacher) and returns the parameters the stage trains, by checkpoint name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import LinearizeError


@dataclass(frozen=True)
class Objective:
    """A registered stage objective.

    Attributes:
        name: the name stages use (`objective`).
        description: one line.
        check: `stage -> None`, raises LinearizeError when the stage's weights do not fit the objective.
        build: `(run, stage) -> objective` with `backward(input_ids, scale) -> dict` (gradients of scale x the
            loss; metrics unscaled), `evaluate(input_ids)` and `close()` (undoes what build switched on).
        whole_model: back-propagates through every layer of the model (for the memory plan).
        select: for a selection stage, which trains nothing: `(run, stage) -> StageResult`, run instead of the
            training loop (`build` is then unused).
    """

    name: str
    description: str
    check: Callable
    build: Callable | None
    whole_model: bool = False
    select: Callable | None = None


@dataclass(frozen=True)
class Trainable:
    """A registered set of trained parameters.

    Attributes:
        name: the name stages use (`trains`).
        description: one line.
        setup: `(run, stage) -> {name: parameter}`, preparing the model and switching gradients on.
        finish: `(run, named) -> None`, switching them off again after the stage.
    """

    name: str
    description: str
    setup: Callable
    finish: Callable


OBJECTIVES: dict[str, Objective] = {}
TRAINABLES: dict[str, Trainable] = {}


def register_objective(objective: Objective) -> Objective:
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective '{objective.name}' is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def register_trainable(trainable: Trainable) -> Trainable:
    if trainable.name in TRAINABLES:
        raise ValueError(f"trainable set '{trainable.name}' is already registered")
    TRAINABLES[trainable.name] = trainable
    return trainable


@dataclass(frozen=True)
class LossWeights:
    """Weights of the language-model objectives."""

    ce_weight: float
    kd_weight: float
    kd_temperature: float


def _check_attention(stage) -> None:
    if stage.mse_weight < 0 or stage.xent_weight < 0 or stage.mse_weight + stage.xent_weight == 0:
        raise LinearizeError(f"{stage.name}.mse_weight and {stage.name}.xent_weight must be >= 0 and not both 0")


def _check_nothing(stage) -> None:
    pass


def _check_mix(stage) -> None:
    if stage.ce_weight < 0 or stage.kd_weight < 0 or stage.ce_weight + stage.kd_weight == 0:
        raise LinearizeError(f"{stage.name}.ce_weight and {stage.name}.kd_weight must be >= 0 and not both 0")


def _check_select(stage) -> None:
    if not 0.0 < stage.softmax_budget <= 1.0:
        raise LinearizeError(
            f"{stage.name}.softmax_budget must be a fraction in (0, 1] (of the model's layers restored to softmax), "
            f"got {stage.softmax_budget}"
        )


def _kl_restore(run, stage):
    from .select import kl_restore_stage

    return kl_restore_stage(run, stage)


def _attention_objective(target: str) -> Callable:
    def build(run, stage):
        from ..attention import converted_modules
        from .transfer import TransferObjective

        # The layer-wise mode holds one layer's graph at a time already; the joint mode recomputes each layer's.
        recompute = run.checkpointing and not stage.layerwise
        return TransferObjective(run.teacher, converted_modules(run.model), stage, target=target, recompute=recompute)

    return build


def _lm_objective(ce: float | None, kd: float | None) -> Callable:
    """Fixed weights, or None to take the stage's `ce_weight`/`kd_weight`."""

    def build(run, stage):
        from .finetune import FinetuneObjective

        weights = LossWeights(
            stage.ce_weight if ce is None else ce, stage.kd_weight if kd is None else kd, stage.kd_temperature
        )
        teacher = run.teacher if weights.kd_weight > 0 else None
        return FinetuneObjective(run.model, teacher, weights, checkpointing=run.checkpointing)

    return build


for _objective in (
    Objective(
        "attention_output",
        "MSE between student and teacher per-head attention outputs (before o_proj), plus the attention-weight "
        "cross-entropy when xent_weight > 0",
        _check_attention,
        _attention_objective("heads"),
    ),
    Objective(
        "hidden_state",
        "L2 between student and teacher attention outputs after o_proj (the layer's contribution to the residual "
        "stream), plus the attention-weight cross-entropy when xent_weight > 0",
        _check_attention,
        _attention_objective("output"),
    ),
    Objective("ce", "next-token cross-entropy on the data", _check_nothing, _lm_objective(1.0, 0.0), whole_model=True),
    Objective(
        "kl",
        "KL(teacher || student) on next-token distributions",
        _check_nothing,
        _lm_objective(0.0, 1.0),
        whole_model=True,
    ),
    Objective(
        "mix", "ce_weight x cross-entropy + kd_weight x KL", _check_mix, _lm_objective(None, None), whole_model=True
    ),
    Objective(
        "kl_restore",
        "selection, trains nothing: restore each converted layer alone to softmax and keep the softmax_budget "
        "fraction of layers whose restoration lowers KL(teacher || student) most, measured on `tokens` held-out "
        "tokens",
        _check_select,
        None,
        select=_kl_restore,
    ),
):
    register_objective(_objective)


def _set_grad(named: dict, flag: bool) -> None:
    for p in named.values():
        p.requires_grad_(flag)


def _new_attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    from ..attention import converted_modules

    return {
        f"layers.{idx}.{name}": p
        for idx, module in converted_modules(model).items()
        for name, p in module.named_new_parameters().items()
    }


def _setup_attention(run, stage) -> dict:
    named = _new_attention_parameters(run.model)
    _set_grad(named, True)
    return named


def _ensure_adapters(run, stage) -> None:
    """Wrap the model with LoRA adapters once; later LoRA stages train the same adapters."""
    from .finetune import add_lora

    if run.adapters is None:
        run.model = add_lora(run.model, stage.lora)
        run.lora = stage.lora
        run.adapters = {id(p) for p in run.model.parameters() if p.requires_grad}


def _lora_setup(with_attention: bool) -> Callable:
    def setup(run, stage) -> dict:
        _ensure_adapters(run, stage)
        wanted = set(run.adapters)
        if with_attention:
            wanted |= {id(p) for p in _new_attention_parameters(run.model).values()}
        # Named in the model's own order, so checkpoints and gradient clipping see the parameters as before.
        named = {n: p for n, p in run.model.named_parameters() if id(p) in wanted}
        _set_grad(named, True)
        run.model.train()
        return named

    return setup


def _setup_all(run, stage) -> dict:
    if run.sharded:
        raise LinearizeError(f"{stage.name}.trains=all cannot run with run.fsdp (the frozen weights are sharded)")
    if run.adapters is not None:
        raise LinearizeError(f"{stage.name}.trains=all after a LoRA stage is not supported; put it before")
    if not run.untied:
        # The student shares every weight with the teacher; training them all needs a copy of its own.
        run.model = copy.deepcopy(run.model)
        run.untied = True
    named = dict(run.model.named_parameters())
    _set_grad(named, True)
    run.model.train()
    return named


def _finish(run, named) -> None:
    _set_grad(named, False)


for _trainable in (
    Trainable("attention", "the parameters conversion added (what each kind declares new)", _setup_attention, _finish),
    Trainable("lora", "LoRA adapters on lora.target_modules", _lora_setup(False), _finish),
    Trainable("lora+attention", "LoRA adapters and the new attention parameters", _lora_setup(True), _finish),
    Trainable("all", "every weight of the student (a copy untied from the teacher)", _setup_all, _finish),
):
    register_trainable(_trainable)
