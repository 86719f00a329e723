"""The converted attention module of the gated kinds (gla, liger, lizard, lawcat) and its decoding state.

One module, configured by each kind's file: the teacher's q/k/v/o (and q/k norms) are adopted; optionally a short
causal conv on q/k/v (LAWCAT); a feature map on q/k for the linear branch (learned Hedgehog, or Liger's
parameter-free softmax), with or without RoPE (Lizard drops it there); normalised gated linear attention with the
kind's gate (`kernels/gla`, fla on CUDA); optionally a sliding-window softmax with sink logits (`kernels/window`),
mixed with the linear branch under one shared normaliser (Lizard) or averaged with it (Liger). Key/value heads
listed in `attention.softmax_heads` keep the teacher's exact softmax over every past token (heads.py); the feature
maps, gate, sinks and conv cover the other heads only, and the state becomes a `SoftmaxHeadsState` around
`GatedState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import LinearizeError
from ..kernels.gla import gated_linear_attention
from ..kernels.gla.naive import EPS, expand_heads
from ..kernels.window import WindowState, window_attention
from .feature_maps import HedgehogFeatureMap
from .heads import HeadSplit, config_head_dim, softmax_heads_bytes, split_attention
from .projection import project_qkv, rope_function, rotate_qk
from .registry import Control, ConvertedAttention
from .short_conv import ShortConv

# How the window branch meets the linear one: one shared normaliser, or the mean of the two normalised outputs.
MIXES = ("shared", "average")


@dataclass(frozen=True)
class GatedState:
    """Decoding state of one gated layer; its size does not grow with the tokens seen.

    Attributes:
        linear: `[B, H, K, V + 1]` fp32 gated sums of k v^T, the last column the normaliser's gated key sum.
        window: the last W - 1 raw keys and values, or None without a window.
        conv: `[B, kernel - 1, C]` the short conv's last inputs (q, k, v side by side), or None without one.
    """

    linear: torch.Tensor
    window: WindowState | None = None
    conv: torch.Tensor | None = None

    def _map(self, fn) -> GatedState:
        window = WindowState(*(fn(t) for t in self.window.tensors())) if self.window is not None else None
        return GatedState(fn(self.linear), window, fn(self.conv) if self.conv is not None else None)

    def index_select(self, indices: torch.Tensor) -> GatedState:
        return self._map(lambda t: t.index_select(0, indices.to(t.device)))

    def repeat_interleave(self, repeats: int) -> GatedState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device) -> GatedState:
        return self._map(lambda t: t.to(device))

    def tensors(self) -> list[torch.Tensor]:
        window = list(self.window.tensors()) if self.window is not None else []
        return [self.linear, *window, *([self.conv] if self.conv is not None else [])]


class GatedAttention(ConvertedAttention):
    """Normalised gated linear attention around a teacher's attention module, optionally with a window branch.

    Args:
        original: the softmax attention module being replaced; its children are adopted.
        layer_idx: index of the decoder layer.
        gate: module `(hidden [B, T, hidden], keys [B, T, Hkv, D]) -> g [B, T, Hg, K or 1]` (see gates.py), over
            the linear heads only when some are kept softmax (`HeadSplit.of_layer`).
        feature: `hedgehog` (learned per-head map, 2F features, identity start) or `softmax` (Liger's, D features).
        feature_dim: F of the Hedgehog map.
        rope_linear: apply RoPE to the linear branch's q/k (the window branch always has it).
        window: exact-softmax window in tokens (current one included); 0 for none.
        sinks: learnable sink logits per head added to the window's normaliser (Lizard); 0 for none.
        mix: `shared` or `average` (see MIXES).
        conv_kernel: kernel of the short causal conv on q/k/v; 0 for none.
        chunk_size: tokens per chunk of the PyTorch GLA path.
        window_chunk_size: queries per chunk of the window branch.
        softmax_kv_heads: key/value heads kept as exact softmax over every past token, with their query heads.
    """

    def __init__(self, original: nn.Module, layer_idx: int, gate: nn.Module, feature: str = "hedgehog",
                 feature_dim: int = 64, rope_linear: bool = True, window: int = 0, sinks: int = 0,
                 mix: str = "shared", conv_kernel: int = 0, chunk_size: int = 64,
                 window_chunk_size: int = 128, softmax_kv_heads: tuple[int, ...] = ()):  # fmt: skip
        super().__init__(original, layer_idx)
        config = original.config
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = original.head_dim, original.scaling
        self.softcap = getattr(original, "attn_logit_softcapping", None)
        self.rope = rope_function(original)
        self.feature, self.feature_dim, self.rope_linear = feature, feature_dim, rope_linear
        self.window, self.mix, self.chunk_size, self.window_chunk_size = window, mix, chunk_size, window_chunk_size
        # Evaluation controls switch one branch off; training never does.
        self.use_linear, self.use_window = True, True
        self.split = HeadSplit(self.num_heads, self.num_kv_heads, softmax_kv_heads)
        # The new parameters are the linear heads' (H of them, Hkv key/value heads); kept heads have none.
        H, Hkv = self.split.num_linear_heads, len(self.split.linear_kv)
        ref = next(original.parameters())
        self.gate = gate.to(ref.device)
        if feature == "hedgehog":
            self.feature_map_q = HedgehogFeatureMap(H, self.head_dim, feature_dim).to(ref.device)
            self.feature_map_k = HedgehogFeatureMap(H, self.head_dim, feature_dim).to(ref.device)
        elif feature != "softmax":
            raise ValueError(f"feature must be 'hedgehog' or 'softmax', got {feature!r}")
        self.init_sink = 0.0
        if sinks:
            self.sinks = nn.Parameter(torch.full((H, sinks), self.init_sink, device=ref.device))
        if conv_kernel and H:
            channels = (H + 2 * Hkv) * self.head_dim
            self.conv = ShortConv(channels, conv_kernel).to(ref.device)
        self.float_new_parameters()

    def reset_new_parameters(self, names=None) -> None:
        """Identity feature maps and conv, gates near 1, sink logits at 0: the teacher is not consulted."""
        names = list(self.named_new_parameters() if names is None else names)
        for prefix in ("gate", "feature_map_q", "feature_map_k", "conv"):
            if any(n.split(".", 1)[0] == prefix for n in names):
                getattr(self, prefix).reset_parameters()
        if "sinks" in names:
            with torch.no_grad():
                self.sinks.fill_(self.init_sink)

    def _features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature == "softmax":
            return q.float().softmax(-1), k.float().softmax(-1)
        # The Hedgehog maps are per query head: keys are shared out to the query heads first.
        return self.feature_map_q(q), self.feature_map_k(expand_heads(k, q.shape[2]))

    def linear_heads(self, hidden, position_embeddings, q, k, v, token_mask, state, output_final_state, cu_seqlens):
        """The gated op on the linear heads' un-rotated q `[B, T, H, D]`, k and v `[B, T, Hkv, D]`
        (`split_attention`'s `LinearOp` once `hidden` and `position_embeddings` are bound): `(out, GatedState)`.

        Packed sequences (`cu_seqlens`) go to the GLA op in one call (fla takes them in one row); with a window,
        sequence by sequence, and no state comes back.
        """
        if cu_seqlens is None or self.window == 0:
            return self._core(hidden, position_embeddings, q, k, v, token_mask, state, cu_seqlens)
        bounds = cu_seqlens.tolist()
        cos, sin = position_embeddings
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            mask = token_mask[:, a:b] if token_mask is not None else None
            part = (t[:, a:b] for t in (q, k, v))
            outs.append(self._core(hidden[:, a:b], (cos[:, a:b], sin[:, a:b]), *part, mask, None)[0])
        return torch.cat(outs, 1), None

    def _core(self, hidden, position_embeddings, q, k, v, token_mask, state: GatedState | None, cu_seqlens=None):
        H, Hkv, D = q.shape[2], k.shape[2], self.head_dim
        conv_state = None
        if hasattr(self, "conv"):
            x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
            x, conv_state = self.conv.packed(x, state.conv if state is not None else None, token_mask, cu_seqlens)
            q, k, v = (t.unflatten(-1, (-1, D)) for t in x.split([H * D, Hkv * D, Hkv * D], -1))
        qr, kr = rotate_qk(self, q, k, position_embeddings)

        fq, fk = self._features(qr, kr) if self.rope_linear else self._features(q, k)
        g = self.gate(hidden, k)
        g = g.expand(*g.shape[:-1], fq.shape[-1])
        # Normalised GLA as one call: v with a column of ones gives the normaliser beside the numerator.
        v_aug = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        dtype = hidden.dtype
        out, linear = gated_linear_attention(
            fq.to(dtype), fk.to(dtype), v_aug, g, scale=1.0,
            initial_state=state.linear if state is not None else None, output_final_state=True,
            token_mask=token_mask, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size,
        )  # fmt: skip
        out = out.float() * self.use_linear
        num, den = out[..., :-1], out[..., -1]
        window_state = None
        if self.window > 0:
            num_w, den_w, window_state = window_attention(
                qr, kr, v, self.window, self.scaling, getattr(self, "sinks", None), self.softcap, token_mask,
                state.window if state is not None else None, output_final_state=True, chunk_size=self.window_chunk_size,
            )  # fmt: skip
            num_w, den_w = num_w * self.use_window, den_w * self.use_window
            if self.mix == "shared":
                num, den = num + num_w, den + den_w
            elif self.use_linear and self.use_window:
                mean = 0.5 * num / (den[..., None] + EPS) + 0.5 * num_w / (den_w[..., None] + EPS)
                return mean.to(dtype), GatedState(linear, window_state, conv_state)
            elif self.use_window:
                num, den = num_w, den_w
        return (num / (den[..., None] + EPS)).to(dtype), GatedState(linear, window_state, conv_state)

    def attention_heads(self, hidden_states, position_embeddings, token_mask=None, cache=None, cu_seqlens=None):
        """Per-head attention output before `o_proj`: `[B, T, hidden]` -> `[B, T, H * Dv]`.

        `cu_seqlens` (`[N + 1]`) marks sequences packed along T (B = 1): each runs from an empty state.
        """
        cos, sin = position_embeddings
        # The projections with norms but no rotation (RoPE with cos 1, sin 0), so that the conv and Lizard's
        # linear branch see un-rotated q/k; RoPE follows with the architecture's own function.
        q, k, v = project_qkv(self, hidden_states, (torch.ones_like(cos), torch.zeros_like(sin)))
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        linear_op = partial(self.linear_heads, hidden_states, position_embeddings)
        rotate = partial(rotate_qk, self, position_embeddings=position_embeddings)
        out = split_attention(
            self.split, linear_op, q, k, v, self.scaling, self.softcap, token_mask, layer, cu_seqlens, rotate=rotate
        )
        return out.reshape(*hidden_states.shape[:-1], -1)

    def attention_weights(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        raise LinearizeError(
            "the gated kinds have no attention-weight cross-entropy term: set the transfer stage's xent_weight=0"
        )

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, feature={self.feature}, window={self.window}, mix={self.mix}, "
            f"rope_linear={self.rope_linear}" + (f", softmax_kv_heads={self.split.softmax_kv}" if self.split else "")
        )


def gated_state_bytes(config, cfg, layer_idx: int, tokens: int, batch: int, dtype_bytes: int, features: int | None,
                      window: int = 0, conv_kernel: int = 0) -> int:  # fmt: skip
    """Bytes of a gated layer's cache after `tokens` tokens: per linear query head the fp32 gated sums
    `[K, D + 1]` (K = `features`, None for the head size), the window's last W - 1 keys, values and mask of the linear
    key/value heads, the conv's last inputs; plus the kept softmax heads' keys, values and mask, which grow."""
    head_dim = config_head_dim(config)
    split = HeadSplit.of_layer(config, cfg, layer_idx)
    H, Hkv = split.num_linear_heads, len(split.linear_kv)
    linear = 0
    if H:
        state = 4 * H * (features or head_dim) * (head_dim + 1)
        slots = max(window - 1, 0) * (2 * Hkv * head_dim * dtype_bytes + 1)
        conv = max(conv_kernel - 1, 0) * (H + 2 * Hkv) * head_dim * dtype_bytes
        linear = batch * (state + slots + conv)
    return linear + softmax_heads_bytes(len(split.softmax_kv), head_dim, tokens, batch, dtype_bytes)


def _window_only(module: GatedAttention):
    module.use_linear = False

    def restore():
        module.use_linear = True

    return restore


def _linear_only(module: GatedAttention):
    module.use_window = False

    def restore():
        module.use_window = True

    return restore


# The two branches of a gated module with a window, each switched off in turn by the evaluation controls.
GATED_WINDOW_CONTROLS = {
    "window-only": Control("sliding-window softmax alone (gated linear branch off)", lambda m: m.window > 0,
                           _window_only),
    "linear-only": Control("the gated linear branch alone (window off)", lambda m: m.window > 0, _linear_only),
}  # fmt: skip
