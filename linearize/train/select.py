"""Selection stages: which converted layers go back to softmax, measured on the student as the stages left it.

`kl_restore` (KL-guided layer selection, after "Distilling to hybrid attention via KL-guided layer selection",
fla-org/hybrid-distillation): with every converted layer as trained so far, measure KL(teacher || student) on
held-out sequences; then restore each converted layer alone to the teacher's softmax attention and measure again.
The layers whose restoration lowers the KL most are kept as softmax under the stage's `softmax_budget` (a fraction
of all layers, rounded to the nearest layer; ties to the lower index). Unlike the copy probe, which scores the
teacher, this scores the student's actual losses after attention transfer. The peers rank by a short distillation
run per layer; this restores without training, so it costs one forward per converted layer.

The choice is written to `<run>/<stage>.selection.json` and into the model's settings (`softmax_layers`, the
layer plan, `selection`), so a resumed run re-applies it without measuring and the export reloads with it.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from torch import nn

from ..errors import LinearizeError
from .loop import StageResult
from .losses import LossWeights, final_hidden, output_head, vocab_losses

logger = logging.getLogger(__name__)


def _attention_paths(model: nn.Module) -> dict[int, str]:
    """The module path of each converted attention module, by layer index."""
    from ..attention import ConvertedAttention

    return {m.layer_idx: name for name, m in model.named_modules() if isinstance(m, ConvertedAttention)}


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at `path` in `model`; returns what was there."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _restore(run, path: str) -> nn.Module:
    """Put a twin of the teacher's softmax attention at `path` in the student (its own module, the teacher's
    weights, so later LoRA wraps the twin and never the teacher); returns the converted module it replaced."""
    from ..models.twin import shallow_twin

    return _swap(run.model, path, shallow_twin(run.teacher.get_submodule(path)))


@torch.no_grad()
def _kl(run, sequences: torch.Tensor, batch_size: int, teacher_cache: dict | None = None) -> float:
    """Mean per-token KL(teacher || student) over `sequences` `[N, T]`; `teacher_cache` keeps the teacher's final
    hidden states by batch between calls on the same sequences."""
    weights = LossWeights(ce=0.0, kd=1.0)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size].to(run.ctx.device)
        if teacher_cache is not None and start in teacher_cache:
            teacher_hidden = teacher_cache[start]
        else:
            teacher_hidden = final_hidden(run.teacher, ids)
            if teacher_cache is not None:
                teacher_cache[start] = teacher_hidden
        hidden = final_hidden(run.model, ids)
        loss, _ = vocab_losses(
            hidden,
            ids.new_zeros(ids.numel()),
            output_head(run.model),
            weights,
            teacher_hidden,
            output_head(run.teacher),
        )
        total += loss.item() * ids.numel()
        count += ids.numel()
    return total / count


def restore_layers(run, layers: list[int]) -> None:
    """Give `layers` of the student back the teacher's softmax attention (a twin of the teacher's module sharing
    its weights) and record it in the model's settings."""
    paths = _attention_paths(run.model)
    missing = [layer for layer in layers if layer not in paths]
    if missing:
        raise LinearizeError(f"layers {missing} are not converted in this run; a resumed run must use its recipe")
    settings = run.model.config.linearize
    for layer in layers:
        _restore(run, paths[layer])
        settings["layers"][str(layer)] = "softmax"
    attention = settings["attention"]
    attention["softmax_layers"] = sorted(set(attention.get("softmax_layers") or []) | set(layers))
    # A softmax layer keeps every head: kept heads listed for it no longer mean anything.
    for layer in layers:
        (attention.get("softmax_heads") or {}).pop(str(layer), None)


def kl_with_restored(
    run, layers: list[int], sequences: torch.Tensor, batch_size: int, teacher_cache: dict | None = None
) -> float:
    """Held-out KL(teacher || student) with `layers` restored to softmax for the measurement only (`teacher_cache`:
    as `_kl`'s, for several calls on the same sequences)."""
    paths = _attention_paths(run.model)
    was_training = run.model.training
    run.model.eval()
    converted = {layer: _restore(run, paths[layer]) for layer in layers}
    try:
        return _kl(run, sequences, batch_size, teacher_cache)
    finally:
        for layer, module in converted.items():
            _swap(run.model, paths[layer], module)
        run.model.train(was_training)


def kl_restore_scores(
    run, sequences: torch.Tensor, batch_size: int, desc: str = "select", teacher_cache: dict | None = None
) -> tuple[float, dict[int, float]]:
    """KL with every converted layer linear, and with each one alone restored to softmax (a progress bar over the
    layers on the main process; `teacher_cache` as `_kl`'s, to keep the teacher's states for a later call)."""
    from tqdm.auto import tqdm

    layers = sorted(_attention_paths(run.model))
    bar = tqdm(total=len(layers) + 1, desc=desc, unit="layer", dynamic_ncols=True, disable=not run.ctx.main)
    teacher = {} if teacher_cache is None else teacher_cache
    try:
        baseline = kl_with_restored(run, [], sequences, batch_size, teacher)
        bar.update()
        restored = {}
        for layer in layers:
            restored[layer] = kl_with_restored(run, [layer], sequences, batch_size, teacher)
            bar.set_postfix(layer=layer, kl=f"{restored[layer]:.4f}")
            bar.update()
    finally:
        bar.close()
    return baseline, restored


def choose(num_layers: int, budget: float, baseline: float, restored: dict[int, float]) -> list[int]:
    """The layers kept under `budget` (a fraction of `num_layers`): the largest KL drops, ties to the lower index."""
    count = min(len(restored), math.floor(budget * num_layers + 0.5))
    ranked = sorted(restored, key=lambda layer: (restored[layer] - baseline, layer))
    return sorted(ranked[:count])


def kl_restore_stage(run, stage) -> StageResult:
    """Run a `kl_restore` stage: measure (or, on resume, read) the choice and restore the chosen layers."""
    if run.sharded:
        raise LinearizeError(f"{stage.name}: objective kl_restore does not run with run.fsdp=true; set it false")
    if run.lora is not None or run.untied:
        raise LinearizeError(
            f"{stage.name}: a kl_restore stage must come before the stages that add LoRA or train every weight"
        )
    started = time.perf_counter()
    record_path = run.run_dir / f"{stage.name}.selection.json"
    if run.resume and record_path.exists():
        record = json.loads(record_path.read_text())
        logger.info("%s: restoring layers %s to softmax, as chosen before", stage.name, record["layers"])
        restore_layers(run, record["layers"])
    else:
        data = run.data_for(stage)
        seq_len = data.validation.shape[1]
        wanted = max(1, stage.tokens // seq_len)
        sequences = data.validation[:wanted]
        if not len(sequences):
            raise LinearizeError(
                f"{stage.name}: kl_restore measures on held-out sequences and the data has none; give more text "
                "(data.dataset) or a shorter data.seq_len"
            )
        if len(sequences) < wanted:
            logger.warning(
                "%s: %d held-out sequences of %d tokens, fewer than tokens=%d asks for; measuring on those",
                stage.name, len(sequences), seq_len, stage.tokens,
            )  # fmt: skip
        teacher: dict = {}
        baseline, restored = kl_restore_scores(run, sequences, stage.batch_size, stage.name, teacher)
        layers = choose(run.model.config.num_hidden_layers, stage.softmax_budget, baseline, restored)
        if run.ctx.world > 1:
            # One choice for every process, whatever rounding differences the measurements had.
            shared = [layers]
            torch.distributed.broadcast_object_list(shared, src=0)
            layers = shared[0]
        restore_layers(run, layers)
        selected = kl_with_restored(run, [], sequences, stage.batch_size, teacher)
        record = {
            "criterion": "kl_restore",
            "stage": stage.name,
            "softmax_budget": stage.softmax_budget,
            "tokens": int(sequences.numel()),
            "kl_all_converted": round(baseline, 6),
            "kl_restored": {str(k): round(v, 6) for k, v in restored.items()},
            "layers": layers,
            "kl_selected": round(selected, 6),
        }
        if run.ctx.main:
            record_path.write_text(json.dumps(record, indent=2))
        logger.info(
            "%s: KL %.4f with every converted layer, %.4f with layers %s restored to softmax",
            stage.name, baseline, selected, layers,
        )  # fmt: skip
    run.model.config.linearize["kl_selection"] = record
    return StageResult(
        name=stage.name,
        steps=0,
        tokens=record["tokens"],
        seconds=round(time.perf_counter() - started, 1),
        first_loss=record["kl_all_converted"],
        final_loss=record["kl_selected"],
        extra={"selection": record},
    )
