"""Attention transfer: the new attention learns to reproduce the teacher's attention, layer by layer.

Forward hooks on the teacher's attention modules capture, for every converted layer, the layer's input (the
teacher's own residual stream), its rotary embeddings and its target: the per-head output (the input of `o_proj`,
objective `attention_output`) or the output after `o_proj` (`hidden_state`). The student's attention module of
that layer then runs on the same input, and the loss is the MSE between the two (times `mse_weight`), plus
optionally the cross-entropy between the attention weights. The teacher runs under SDPA; T x T matrices exist
only when the cross-entropy term asks for them.

Layers never see each other's student outputs, so the layers' losses are independent. `layerwise` exploits
that: each layer's loss is back-propagated inside the teacher's forward as soon as that layer has run, so only
one layer's graph is alive at a time; the result equals the joint mode's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import ConvertedAttention, converted_modules
from ..config import StageConfig
from ..kernels.hybrid import keeping_states


@dataclass
class _Captured:
    hidden: torch.Tensor
    position_embeddings: tuple
    target: torch.Tensor | None = None


def teacher_attention_modules(teacher: nn.Module, layers: list[int]) -> dict[int, nn.Module]:
    """The teacher's attention module of each listed layer."""
    decoder = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.model
    return {idx: decoder.layers[idx].self_attn for idx in layers}


def student_attention_modules(student: nn.Module) -> dict[int, ConvertedAttention]:
    return converted_modules(student)


TARGETS = ("heads", "output")


class TransferObjective:
    """Computes the attention-transfer loss of a batch from a frozen teacher and the student's converted modules.

    Args:
        teacher: the original causal LM (frozen, unconverted).
        students: converted attention modules by layer index (they share the teacher's projections).
        cfg: the stage: `mse_weight`, `xent_weight` and `layerwise`.
        target: "heads" matches the per-head outputs before `o_proj`, "output" the outputs after it.
        recompute: in the joint mode, keep only each layer's inputs for the backward and run its attention again
            there (activation checkpointing); the layer-wise mode holds one layer's graph anyway.
    """

    def __init__(
        self,
        teacher: nn.Module,
        students: dict[int, ConvertedAttention],
        cfg: StageConfig,
        target: str = "heads",
        recompute: bool = False,
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.teacher, self.students, self.cfg, self.target = teacher, students, cfg, target
        self.teacher_attn = teacher_attention_modules(teacher, sorted(students))
        self.recompute = recompute

    def _layer_terms(self, idx: int, hidden: torch.Tensor, position_embeddings, target: torch.Tensor):
        """`(loss, mse, xent)` of one layer as tensors (xent 0 when unused); no host sync, so it can be
        checkpointed."""
        cap = _Captured(hidden, position_embeddings, target)
        student = self.students[idx]
        pred = student.attention_heads(hidden, position_embeddings)
        if self.target == "output":
            pred = student.o_proj(pred)
        mse = F.mse_loss(pred.float(), cap.target.float())
        loss = self.cfg.mse_weight * mse
        xent = mse.new_zeros(())
        if self.cfg.xent_weight > 0:
            xent = self._weights_xent(idx, cap)
            loss = loss + self.cfg.xent_weight * xent
        return loss, mse.detach(), xent.detach()

    def _layer_loss(self, idx: int, cap: _Captured, recompute: bool = False) -> tuple[torch.Tensor, dict]:
        """One layer's loss and its metrics; `recompute` keeps only its inputs for the backward (activation
        checkpointing) and runs the layer again there."""
        if recompute and torch.is_grad_enabled():
            loss, mse, xent = checkpoint(
                self._layer_terms, idx, cap.hidden, cap.position_embeddings, cap.target, use_reentrant=False
            )
        else:
            loss, mse, xent = self._layer_terms(idx, cap.hidden, cap.position_embeddings, cap.target)
        stats = {"mse": mse.item()}
        if self.cfg.xent_weight > 0:
            stats["xent"] = xent.item()
        return loss, stats

    def _weights_xent(self, idx: int, cap: _Captured) -> torch.Tensor:
        student = self.students[idx]
        with torch.no_grad():
            from ..attention.projection import project_qkv

            q, k, _ = project_qkv(student, cap.hidden, cap.position_embeddings)
            groups = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(groups, dim=2)
            scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * student.scaling
            if student.softcap:
                scores = student.softcap * torch.tanh(scores / student.softcap)
            T = scores.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
            teacher_p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        student_p = student.attention_weights(cap.hidden, cap.position_embeddings)
        return -(teacher_p * torch.log(student_p.clamp_min(1e-12))).sum(-1).mean()

    @contextlib.contextmanager
    def _hooks(self, on_layer=None):
        """Capture inputs and per-head outputs of the converted layers during one teacher forward."""
        captured: dict[int, _Captured] = {}
        handles = []
        for idx, attn in self.teacher_attn.items():

            def pre(module, args, kwargs, idx=idx):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                captured[idx] = _Captured(hidden.detach(), kwargs.get("position_embeddings"))

            def o_pre(module, args, idx=idx):
                captured[idx].target = args[0].detach()

            def out(module, args, output, idx=idx):
                captured[idx].target = output[0].detach()

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            if self.target == "heads":
                handles.append(attn.o_proj.register_forward_pre_hook(o_pre))
            else:
                handles.append(attn.register_forward_hook(out))
            if on_layer is not None:

                def post(module, args, output, idx=idx):
                    on_layer(idx, captured.pop(idx))

                handles.append(attn.register_forward_hook(post))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _teacher_forward(self, input_ids: torch.Tensor) -> None:
        decoder = self.teacher.get_decoder() if hasattr(self.teacher, "get_decoder") else self.teacher.model
        with torch.no_grad():
            decoder(input_ids=input_ids, use_cache=False)

    def backward(self, input_ids: torch.Tensor, scale: float = 1.0) -> dict:
        """Forward and backward for one (micro-)batch; gradients are of `scale` x its loss, metrics unscaled."""
        stats: dict[str, float] = {}
        total = 0.0

        def consume(idx: int, cap: _Captured):
            nonlocal total
            # The layer's backward runs right away, so its attention keeps the features and states its forward
            # computed instead of recomputing them: one layer's worth of memory (docs/BENCHMARKS.md).
            with torch.enable_grad(), keeping_states():
                loss, layer_stats = self._layer_loss(idx, cap)
                (loss * scale).backward()
            total += loss.item()
            for key, value in layer_stats.items():
                stats[f"{key}/{idx}"] = value

        if self.cfg.layerwise:
            with self._hooks(on_layer=consume):
                self._teacher_forward(input_ids)
        else:
            with self._hooks() as captured:
                self._teacher_forward(input_ids)
            losses = []
            for idx in sorted(captured):
                loss, layer_stats = self._layer_loss(idx, captured[idx], recompute=self.recompute)
                losses.append(loss)
                for key, value in layer_stats.items():
                    stats[f"{key}/{idx}"] = value
            joint = torch.stack(losses).sum()
            (joint * scale).backward()
            total = joint.item()
        return {"loss": total, **stats}

    def close(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> tuple[float, dict[int, float]]:
        """Total loss and per-layer MSE on a batch, without gradients."""
        with self._hooks() as captured:
            self._teacher_forward(input_ids)
        per_layer, total = {}, 0.0
        for idx in sorted(captured):
            loss, layer_stats = self._layer_loss(idx, captured[idx])
            per_layer[idx] = layer_stats["mse"]
            total += loss.item()
        return total, per_layer
