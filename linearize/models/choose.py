"""Which layers and heads stay softmax under a budget, chosen on the teacher while conversion runs.

`attention.softmax_budget` and `attention.softmax_head_budget` are fractions; this module turns them into explicit
lists (`softmax_layers`, `softmax_heads`) by the teacher's retrieval scores (attention/selection.py), before any
module is swapped. Conversion stores the lists in the settings, and the scores and budgets beside them, so a
reload rebuilds the same model without scoring again.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from ..attention.selection import retrieval_scores, select_softmax_heads, select_softmax_layers
from ..config import AttentionConfig, to_dict
from ..errors import LinearizeError

logger = logging.getLogger(__name__)


def choose_softmax(
    model: nn.Module, attention: AttentionConfig, attention_cls: type, plan: dict[str, str]
) -> tuple[AttentionConfig, dict | None]:
    """Resolve the softmax budgets of `attention` on the unconverted `model`.

    Args:
        model: the teacher (or a twin of it whose attention is not swapped yet).
        attention: the recipe's attention settings.
        attention_cls: the family's softmax attention class.
        plan: the kind of every layer before the budgets (`plan_layers`); only converted layers are candidates.

    Returns:
        (attention settings with the budgets replaced by the chosen lists, the record of the choice or None when
        there is no budget).
    """
    _check_head_layers(attention, plan)
    if not (attention.softmax_budget or attention.softmax_head_budget):
        return attention, None
    window = attention.effective_window
    if attention.probe.block <= window:
        raise LinearizeError(
            f"attention.probe.block ({attention.probe.block}) must be longer than the window ({window}), or the "
            "window alone reaches the copied token"
        )
    config = model.config
    explicit_head_layers = {int(layer) for layer in attention.softmax_heads}
    converted = [int(i) for i, kind in plan.items() if kind != "softmax"]
    probe = attention.probe
    was_training = model.training
    model.eval()
    try:
        scores = retrieval_scores(model, attention_cls, block=probe.block, samples=probe.samples, seed=probe.seed)
    finally:
        model.train(was_training)
    layers = []
    if attention.softmax_budget:
        pool = [i for i in converted if i not in explicit_head_layers]
        layers = select_softmax_layers(scores, attention.softmax_budget, candidates=pool)
    heads = attention.softmax_heads
    if attention.softmax_head_budget:
        pool = [i for i in converted if i not in layers]
        heads = select_softmax_heads(scores, attention.softmax_head_budget, config.num_key_value_heads, pool)
    resolved = dataclasses.replace(
        attention,
        softmax_budget=0.0,
        softmax_head_budget=0.0,
        softmax_layers=sorted(set(attention.softmax_layers) | set(layers)),
        softmax_heads=heads,
    )
    record = {
        "softmax_budget": attention.softmax_budget,
        "softmax_head_budget": attention.softmax_head_budget,
        "probe": to_dict(probe),
        "softmax_layers": layers,
        "softmax_heads": heads,
        "scores": scores.to_dict(),
    }
    n_heads = sum(len(h) for h in heads.values())
    logger.info(
        "softmax chosen by retrieval score (copy probe, block %d, %d samples, seed %d): layers %s; key/value heads %s "
        "(%d of %d)",
        probe.block,
        probe.samples,
        probe.seed,
        layers or "none",
        heads or "none",
        n_heads,
        config.num_hidden_layers * config.num_key_value_heads,
    )
    return resolved, record


def _check_head_layers(attention: AttentionConfig, plan: dict[str, str]) -> None:
    """Explicit softmax heads must sit in layers that are converted (a softmax layer keeps every head anyway)."""
    for layer in attention.softmax_heads:
        if plan.get(layer, "softmax") == "softmax":
            raise LinearizeError(
                f"attention.softmax_heads names layer {layer}, which is not converted (the model has layers "
                f"0..{len(plan) - 1}; kept softmax layers keep every head): name converted layers only"
            )


def check_heads_built(model: nn.Module, attention: AttentionConfig) -> None:
    """After the swap: every layer with softmax heads was built by a kind that keeps them (has a `HeadSplit`)."""
    from ..attention import converted_modules
    from ..attention.registry import kinds_with

    modules = converted_modules(model)
    for layer, heads in attention.softmax_heads.items():
        split = getattr(modules[int(layer)], "split", None)
        if split is None or split.softmax_kv != heads:
            can = ", ".join(kinds_with("softmax_heads"))
            raise LinearizeError(
                f"attention kind '{attention.kind}' does not keep softmax heads inside a layer; use "
                f"softmax_layers / softmax_budget with it, or a kind that does ({can})"
            )
