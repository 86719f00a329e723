"""Training stages as data: a recipe's `stages` list fills these dataclasses, one per stage, in order.

Each stage names its objective and what it trains (registries in `linearize.train.registry`), its data length,
token budget, batch size and optimiser. `with_stages` also reads first-wave recipes, whose two fixed sections
(`transfer:`, `finetune:`) become the two stages they described.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import LinearizeError


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise LinearizeError(f"{key} must be > 0, got {value}")


@dataclass
class OptimConfig:
    """AdamW and its schedule.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (default 0).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (default 0).
        schedule: "constant" or "cosine" (decays to lr * min_lr_ratio over the stage).
        min_lr_ratio: floor of the cosine schedule as a fraction of lr (default 0.1).
        max_grad_norm: gradient clipping by global norm; 0 disables it.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise LinearizeError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise LinearizeError(f"schedule must be 'constant' or 'cosine', got '{self.schedule}'")
        if len(self.betas) != 2:
            raise LinearizeError(f"betas must be two numbers, got {self.betas}")


@dataclass
class LoraSettings:
    """LoRA adapters of the stages that train them (peft); the first such stage adds them, later ones reuse them.

    Attributes:
        r: rank (LoLCATs: 8).
        alpha: scaling numerator (LoLCATs: 16).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt (LoLCATs: q/k/v/o projections).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StageConfig:
    """One training stage: what it optimises, what it trains, on how much data.

    Attributes:
        name: names the stage's checkpoints, metrics and `--set <name>.key=value` overrides (unique in a recipe).
        objective: registered objective (`linearize.train.objectives.OBJECTIVES`): "attention_output" (MSE
            between student and teacher per-head attention outputs, plus the attention-weight cross-entropy
            when xent_weight > 0), "hidden_state" (L2 between the layers' attention outputs after o_proj),
            "ce" (next-token cross-entropy), "kl" (KL(teacher || student) on next-token distributions, at
            kd_temperature), "mix" (ce_weight x CE + kd_weight x KL), or "kl_restore" (a selection stage that
            trains nothing: the `softmax_budget` fraction of layers whose restoration to softmax lowers the KL to
            the teacher most go back to softmax, measured on `tokens` held-out tokens; see train/select.py).
        trains: registered trainable set (`linearize.train.trainables.TRAINABLES`): "attention" (the new
            attention parameters), "lora" (LoRA adapters), "lora+attention" or "all" (every weight).
        enabled: run the stage (default true); false gives, e.g., the no-transfer control.
        tokens: token budget of the stage.
        batch_size: sequences per optimiser step (per process).
        micro_batch_size: sequences per forward and backward; a step accumulates the gradients of
            batch_size / micro_batch_size of them, with the same result as one big batch. 0 (default) picks: the
            whole batch on CPU; on CUDA the largest divisor of batch_size the memory estimate fits, halved if the
            first step still runs out of memory. Must divide batch_size.
        seq_len: packed sequence length of this stage's data; 0 uses data.seq_len (a long-context stage sets more).
        mse_weight: weight of the MSE of "attention_output" and "hidden_state" (LoLCATs: 1000).
        xent_weight: weight of the attention-weight cross-entropy; > 0 materialises the T x T attention
            matrices, so keep sequences short (default 0).
        layerwise: back-propagate each layer's loss as soon as the teacher has run that layer, so one layer's
            graph is alive at a time instead of all of them (same result as the joint mode).
        ce_weight: weight of the cross-entropy in "mix" (default 1).
        kd_weight: weight of the KL term in "mix" (default 0).
        kd_temperature: softmax temperature of the KL term ("kl" and "mix").
        lora: adapter settings (stages that train LoRA).
        optim: optimiser settings.
        softmax_budget: selection stages: fraction of the model's layers restored to softmax.
    """

    name: str = "stage"
    objective: str = "attention_output"
    trains: str = "attention"
    enabled: bool = True
    tokens: int = 131072
    batch_size: int = 4
    micro_batch_size: int = 0
    seq_len: int = 0
    mse_weight: float = 1000.0
    xent_weight: float = 0.0
    layerwise: bool = False
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    softmax_budget: float = 0.0

    def __post_init__(self):
        from .train.registry import OBJECTIVES, TRAINABLES

        for key, value, registry in (("objective", self.objective, OBJECTIVES), ("trains", self.trains, TRAINABLES)):
            if value not in registry:
                raise LinearizeError(
                    f"{self.name}.{key} '{value}' is unknown; choose one of: {', '.join(sorted(registry))}"
                )
        _positive(f"{self.name}.batch_size", self.batch_size)
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise LinearizeError(
                f"{self.name}.micro_batch_size must be 0 (auto) or divide {self.name}.batch_size "
                f"({self.batch_size}), got {self.micro_batch_size}"
            )
        if self.enabled and self.tokens <= 0:
            raise LinearizeError(f"{self.name}.tokens must be > 0, got {self.tokens}")
        if self.seq_len < 0:
            raise LinearizeError(f"{self.name}.seq_len must be >= 0 (0: data.seq_len), got {self.seq_len}")
        _positive(f"{self.name}.lora.r", self.lora.r)
        if not self.lora.target_modules:
            raise LinearizeError(f"{self.name}.lora.target_modules must name at least one module")
        _positive(f"{self.name}.kd_temperature", self.kd_temperature)
        OBJECTIVES[self.objective].check(self)


def default_stages() -> list[StageConfig]:
    """The two LoLCATs stages: attention transfer of the new parameters, then LoRA with next-token CE."""
    return [
        StageConfig(name="transfer", optim=OptimConfig(lr=1e-2, max_grad_norm=0.0)),
        StageConfig(name="finetune", objective="mix", trains="lora", tokens=32768, optim=OptimConfig(lr=1e-4)),
    ]


# First-wave recipes had two fixed sections; each becomes a stage with the defaults it had then.
LEGACY_SECTIONS = {
    "transfer": {
        "name": "transfer",
        "objective": "attention_output",
        "trains": "attention",
        "tokens": 131072,
        "mse_weight": 1000.0,
        "xent_weight": 0.0,
        "optim": {"lr": 1e-2, "max_grad_norm": 0.0},
    },
    "finetune": {
        "name": "finetune",
        "objective": "mix",
        "trains": "lora",
        "tokens": 32768,
        "ce_weight": 1.0,
        "kd_weight": 0.0,
        "optim": {"lr": 1e-4},
    },
}


def with_stages(data: dict) -> dict:
    """A recipe mapping with a `stages` list: first-wave `transfer:`/`finetune:` sections become the stages they
    describe, and a recipe naming no stages gets the default two."""
    legacy = [key for key in LEGACY_SECTIONS if key in data]
    if legacy and "stages" in data:
        raise LinearizeError(
            f"the recipe has both 'stages' and a '{legacy[0]}:' section; move its settings into the stage of that name"
        )
    if not legacy:
        if "stages" not in data:
            data = {**data, "stages": [dataclasses.asdict(stage) for stage in default_stages()]}
        return data
    data = dict(data)
    stages = []
    for key, defaults in LEGACY_SECTIONS.items():
        section = dict(data.pop(key, None) or {})
        if not isinstance(section, dict):
            raise LinearizeError(f"recipe key '{key}': expected a mapping of settings, got {section!r}")
        if section.pop("train_attention", False):
            section["trains"] = "lora+attention"
        stages.append({**defaults, **section})
    data["stages"] = stages
    return data
