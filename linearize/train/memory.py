"""What a stage will need: an estimate of peak memory and of time, logged before it trains, and the choices that
follow from it (micro-batch size, activation checkpointing).

The activation sizes are rules of thumb per token and decoder layer (what a Llama-style block keeps for its
backward), not a measurement; the time is the stage's floating-point work at an assumed sustained rate, stated as
such in the log. The loop logs the pace actually reached after its first steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .loop import _duration
from .losses import DEFAULT_CHUNK_TOKENS

logger = logging.getLogger(__name__)

GIB = 1024**3
# Sustained training throughput assumed before the first steps have run (bf16 on an H100-class GPU; a CPU).
ASSUMED_FLOPS = {"cuda": 300e12, "cpu": 2e11}
# Fraction of the GPU's memory the plan lets the stage fill; the rest is the allocator's and the kernels'.
USABLE_FRACTION = 0.9


@dataclass
class MemoryPlan:
    """Estimated bytes of one stage at one micro-batch size.

    Attributes:
        weights: every distinct weight of the teacher and the student.
        trainable: trained parameters, their gradients and AdamW's two moments.
        activations: what the forward keeps for the backward, per micro-batch.
        loss: the vocabulary losses' slice of logits (LM objectives) or the captured layer targets (transfer).
    """

    weights: int
    trainable: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.loss


def use_checkpointing(run, stage, trainable: dict, seq_len: int, whole_model: bool) -> bool:
    """Resolve run.gradient_checkpointing for one stage. Auto is off on CPU, and on CUDA off when the stage's
    micro-batch (its setting, else the whole batch) fits the GPU without it: recomputing costs about a third more
    work, so it is only worth it when memory forces it (then a larger micro-batch fits)."""
    setting = run.recipe.run.gradient_checkpointing
    if setting != "auto":
        return setting == "true"
    if run.ctx.device.type != "cuda":
        return False
    budget = torch.cuda.get_device_properties(run.ctx.device).total_memory * USABLE_FRACTION
    sequences = stage.micro_batch_size or stage.batch_size
    return estimate(run, stage, trainable, sequences, seq_len, whole_model, False).total > budget


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in _distinct(model))


def _distinct(*models: nn.Module) -> list[torch.Tensor]:
    seen, params = set(), []
    for model in models:
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    return hidden, getattr(config, "intermediate_size", 4 * hidden), config.num_hidden_layers, config.vocab_size


def estimate(
    run, stage, trainable: dict, sequences: int, seq_len: int, whole_model: bool, checkpointing: bool
) -> MemoryPlan:
    """Peak-memory estimate of `stage` at `sequences` sequences per micro-batch.

    `whole_model`: the objective back-propagates through every layer (LM objectives); otherwise only through the
    converted attention modules (attention transfer).
    """
    hidden, ffn, layers, vocab = _shape(run.teacher)
    element = next(run.teacher.parameters()).element_size()
    tokens = sequences * seq_len
    weights = _bytes(_distinct(run.teacher, run.model)) - _bytes(trainable.values())
    # Parameter, gradient and AdamW's two moments, in the parameters' own dtype.
    state = 4 * _bytes(trainable.values())
    if whole_model:
        # A block keeps its norms' inputs, q/k/v/o, the feature maps and the MLP's three projections' inputs.
        per_layer = tokens * (14 * hidden + 3 * ffn) * element
        kept = tokens * hidden * element * layers + per_layer if checkpointing else per_layer * layers
        loss = min(tokens, DEFAULT_CHUNK_TOKENS) * vocab * 4 * 4 + 2 * tokens * hidden * element
        return MemoryPlan(weights, state, kept, loss)
    # Transfer: captured input and target per converted layer; each layer's graph (features in fp32).
    converted = max(1, len({name.split(".")[1] for name in trainable if name.startswith("layers.")}))
    captured = tokens * 2 * hidden * element * (1 if stage.layerwise else converted)
    graph = tokens * 12 * hidden * 4
    kept = graph if stage.layerwise or checkpointing else graph * converted
    teacher_layer = tokens * (4 * hidden + 2 * ffn) * element
    return MemoryPlan(weights, state, kept + teacher_layer, captured)


def pick_micro_batch(
    run, stage, trainable: dict, seq_len: int, whole_model: bool, checkpointing: bool
) -> tuple[int, MemoryPlan]:
    """The stage's micro-batch size (its setting, else the largest divisor of batch_size the estimate fits; the
    whole batch on CPU) and the plan at that size."""
    batch = stage.batch_size
    device = run.ctx.device
    if stage.micro_batch_size:
        size = stage.micro_batch_size
    elif device.type != "cuda":
        size = batch
    else:
        budget = torch.cuda.get_device_properties(device).total_memory * USABLE_FRACTION
        size = 1
        for candidate in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
            if estimate(run, stage, trainable, candidate, seq_len, whole_model, checkpointing).total <= budget:
                size = candidate
                break
    return size, estimate(run, stage, trainable, size, seq_len, whole_model, checkpointing)


def flops_per_token(run, stage, whole_model: bool, checkpointing: bool, trains_all: bool) -> float:
    """Floating-point work per training token: 2 x parameters per forward, as much again per backward pass."""
    n = _count(run.teacher)
    if not whole_model:
        return 2.0 * n  # the teacher's forward; the converted attention's own work is small beside it
    passes = 2  # student forward, backward to the inputs
    passes += 1 if trains_all else 0  # backward to every weight
    passes += 1 if checkpointing else 0  # the forward again inside the backward
    passes += 1 if getattr(stage, "kd_weight", 0) > 0 or stage.objective == "kl" else 0  # teacher forward
    return 2.0 * n * passes


def log_plan(name: str, plan: MemoryPlan, micro: int, batch: int, checkpointing: bool, tokens: int, flops: float,
             device: torch.device) -> None:  # fmt: skip
    rate = ASSUMED_FLOPS.get(device.type, ASSUMED_FLOPS["cpu"])
    seconds = tokens * flops / rate
    logger.info(
        "%s plan: micro-batch %d of %d, gradient checkpointing %s; estimated peak %.2f GiB (weights %.2f, "
        "trained parameters and optimiser %.2f, activations %.2f, loss %.2f); about %s for %s tokens at an "
        "assumed %.3g TFLOP/s (refined after the first steps)",
        name,
        micro,
        batch,
        "on" if checkpointing else "off",
        plan.total / GIB,
        plan.weights / GIB,
        plan.trainable / GIB,
        plan.activations / GIB,
        plan.loss / GIB,
        _duration(seconds),
        f"{tokens:,}",
        rate / 1e12,
    )
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        if plan.total > capacity:
            logger.warning(
                "%s: the estimate (%.1f GiB) exceeds this GPU (%.1f GiB); lower %s.micro_batch_size or the "
                "sequence length, or set run.gradient_checkpointing=true",
                name,
                plan.total / GIB,
                capacity / GIB,
                name,
            )
