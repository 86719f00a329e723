"""Fine-tuning the converted student with next-token cross-entropy, teacher-logit KD, or both; LoRA adapters.

Adapters come from peft and wrap only the student's projections (the teacher shares the frozen base weights
but not the adapters), so the teacher's logits stay those of the original model for the KD term. After the last
stage the adapters are merged into the weights, which changes the shared base weights: the teacher is not used
after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraSettings


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


class FinetuneObjective:
    """Computes the language-model loss of a batch (objectives `ce`, `kl` and `mix`).

    Args:
        student: the converted model (peft-wrapped when LoRA trains).
        teacher: the original model, used only when `kd_weight > 0`.
        cfg: `ce_weight`, `kd_weight` and `kd_temperature`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg):
        self.student, self.teacher, self.cfg = student, teacher, cfg

    def _loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.student(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        labels = input_ids[:, 1:]
        stats = {}
        loss = logits.new_zeros(())
        if self.cfg.ce_weight > 0:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss = loss + self.cfg.ce_weight * ce
            stats["ce"] = ce.item()
        if self.cfg.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
            t = self.cfg.kd_temperature
            kd = F.kl_div(
                F.log_softmax(logits / t, dim=-1).reshape(-1, logits.shape[-1]),
                F.log_softmax(teacher_logits / t, dim=-1).reshape(-1, logits.shape[-1]),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
            loss = loss + self.cfg.kd_weight * kd
            stats["kd"] = kd.item()
        return loss, stats

    def backward(self, input_ids: torch.Tensor) -> dict:
        loss, stats = self._loss(input_ids)
        loss.backward()
        return {"loss": loss.item(), **stats}

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> float:
        return self._loss(input_ids)[0].item()
