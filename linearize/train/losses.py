"""Next-token cross-entropy and teacher-logit KL over the vocabulary without holding the full logits.

A batch of 8 x 1024 tokens of a 128K-vocabulary model has 4 GiB of fp32 logits per model, and the plain losses keep
several such tensors alive for the backward (logits, log-softmax, the teacher's). Here the final hidden states go
through the output head a slice of tokens at a time; each slice's logits live only inside its own checkpointed
function, so the peak is one slice's logits (recomputed in the backward) whatever the batch. The result equals
the plain losses: a sum over slices of per-token terms, divided by the token count at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Tokens per slice: 4096 x 128K fp32 logits is 2 GiB.
DEFAULT_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class LossWeights:
    """Weights of the two terms; a zero weight skips its term."""

    ce: float = 1.0
    kd: float = 0.0
    temperature: float = 1.0


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`hidden [N, d] -> logits [N, V]` as the model's own forward computes them (final soft-capping included)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def final_hidden(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The decoder's last hidden states `[B, T, d]`, without the output head."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def _slice_terms(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    head: Callable,
    teacher_head: Callable | None,
    weights: LossWeights,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE, summed KL and the weighted sum over one slice of tokens."""
    logits = head(hidden).float()
    zero = logits.new_zeros(())
    ce = F.cross_entropy(logits, labels, reduction="sum") if weights.ce > 0 else zero
    kd = zero
    if weights.kd > 0:
        with torch.no_grad():
            target = F.log_softmax(teacher_head(teacher_hidden).float() / weights.temperature, dim=-1)
        log_p = F.log_softmax(logits / weights.temperature, dim=-1)
        kd = F.kl_div(log_p, target, log_target=True, reduction="sum") * weights.temperature**2
    return ce.detach(), kd.detach(), weights.ce * ce + weights.kd * kd


def vocab_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    weights: LossWeights,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean CE + KL over all tokens, a slice of `chunk_tokens` tokens at a time.

    Args:
        hidden: student's final hidden states `[N, d]` (any leading shape is flattened).
        labels: next-token ids `[N]`.
        head: the student's output head (see `output_head`).
        weights: loss weights and KD temperature.
        teacher_hidden: teacher's final hidden states `[N, d']` (needed when `weights.kd > 0`).
        teacher_head: the teacher's output head.
        chunk_tokens: tokens per slice; changes memory, not the result.

    Returns:
        `(loss, stats)`: the scalar loss to back-propagate, and `{"ce": ..., "kd": ...}` for the terms in use.
    """
    if weights.kd > 0 and (teacher_hidden is None or teacher_head is None):
        raise ValueError("a KD weight needs the teacher's hidden states and output head")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n = labels.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    ce_sum = kd_sum = 0.0
    for start in range(0, n, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        t_part = teacher_hidden[part] if teacher_hidden is not None else None
        args = (hidden[part], labels[part], t_part, head, teacher_head, weights)
        if hidden.requires_grad:
            ce, kd, loss = checkpoint(_slice_terms, *args, use_reentrant=False)
        else:
            ce, kd, loss = _slice_terms(*args)
        total = total + loss
        ce_sum += ce.item()
        kd_sum += kd.item()
    stats = {}
    if weights.ce > 0:
        stats["ce"] = ce_sum / n
    if weights.kd > 0:
        stats["kd"] = kd_sum / n
    return total / n, stats
