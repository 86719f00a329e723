"""Fine-tuning the converted student with next-token cross-entropy, teacher-logit KD, or both; LoRA adapters.

Adapters come from peft and wrap only the student's projections (the teacher shares the frozen base weights
but not the adapters), so the teacher's logits stay those of the original model for the KD term. After the last
stage the adapters are merged into the weights, which changes the shared base weights: the teacher is not used
after.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoraSettings
from .losses import LossWeights, final_hidden, output_head, vocab_losses


def add_lora(student: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap `student` with LoRA adapters; afterwards only the adapters' parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(student, config)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the adapters live in its modules), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FinetuneObjective:
    """Computes the language-model loss of a batch (objectives `ce`, `kl` and `mix`).

    The decoders give their final hidden states and `losses.vocab_losses` applies the output heads a slice of
    tokens at a time, so no full `[batch, seq, vocab]` logits exist, for the student or the teacher.

    Args:
        student: the converted model (peft-wrapped when LoRA trains).
        teacher: the original model, used only when `kd_weight > 0`.
        cfg: `ce_weight`, `kd_weight` and `kd_temperature`.
        checkpointing: keep only each decoder layer's input for the backward and run the layer again there
            (transformers' gradient checkpointing, non-reentrant) until `close()`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg, checkpointing: bool = False):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.weights = LossWeights(cfg.ce_weight, cfg.kd_weight, cfg.kd_temperature)
        self.checkpointing = checkpointing
        if checkpointing:
            model = base_model(student)
            enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if not getattr(model, "_require_grads_hooks", None):
                # Frozen embeddings give inputs without grad; the recomputed layers must still reach the adapters.
                model.enable_input_require_grads()

    def close(self) -> None:
        """Undo the checkpointing switches: the teacher shares the embedding (and its hook), and export wants a
        plain model."""
        if self.checkpointing:
            model = base_model(self.student)
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            model.disable_input_require_grads()

    def _loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        student = base_model(self.student)
        hidden = final_hidden(student, input_ids)[:, :-1]
        teacher_hidden = teacher_head = None
        if self.weights.kd > 0:
            with torch.no_grad():
                teacher_hidden = final_hidden(self.teacher, input_ids)[:, :-1]
            teacher_head = output_head(self.teacher)
        return vocab_losses(hidden, input_ids[:, 1:], output_head(student), self.weights, teacher_hidden, teacher_head)

    def backward(self, input_ids: torch.Tensor, scale: float = 1.0) -> dict:
        """Forward and backward of one (micro-)batch; gradients are of `scale` x its loss, metrics unscaled."""
        loss, stats = self._loss(input_ids)
        (loss * scale).backward()
        return {"loss": loss.item(), **stats}

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> float:
        return self._loss(input_ids)[0].item()
