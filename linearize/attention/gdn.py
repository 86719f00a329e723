"""The `gdn` kind (Gated DeltaNet): the gated delta rule over the teacher's q/k/v, l2-normalised q/k, output norm.

Per head and token (x the layer input): a decay g = -exp(A_log) * softplus(x W_a + dt_bias) and a write strength
beta = sigmoid(x W_b + b_b); the state S [D, D] follows S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} +
beta_t k_t v_t^T and o_t = S_t^T q_t (`kernels/delta`, fla on CUDA), then a per-head RMSNorm and, optionally, an
output gate silu(x W_g + b_g) as fla's GatedDeltaNet layer. Keys and values are shared out to the query heads (as
the KL-guided hybrid distillation does), so the state is per query head. By default q/k are not rotated (fla's
layer has no RoPE; `rope: true` keeps the teacher's) and there is no short conv (its "GDN v4" student; `conv_kernel:
4` adds LAWCAT's identity-start conv on q/k/v).

New parameters (stage 1 trains them), with the start chosen so that nothing depends on a random draw and the layer
remembers from the first step: `a_proj.weight` 0 and `A_log` 0, so g = -softplus(dt_bias) = -dt per head, dt spread
log-uniformly over the heads from `dt_min` to `dt_max` (Mamba's range, 1e-3 .. 1e-1: half-lives of 7 to 690
tokens); `b_proj` 0 (beta = 1/2, half the delta rule's full overwrite); `o_norm.weight` 1; `g_proj.weight` 0 and
its bias 1.2785, where silu = 1, so the gate starts open; `conv.weight` the identity. Decoding state: the [D, D]
fp32 state per query head and the conv's last inputs (`DeltaState`).

Key/value heads listed in `attention.softmax_heads` keep the teacher's exact softmax over every past token, with
their query heads and the teacher's RoPE, scale and soft-cap (heads.py); the new parameters above cover the other
(linear) heads only, so a kept head has nothing to train, and the decoding state is a `SoftmaxHeadsState` holding
the linear heads' `DeltaState` and the kept heads' growing key/value cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LinearizeError
from ..kernels import delta as delta_ops
from .cache import RecurrentLayer
from .heads import HeadSplit, config_head_dim, softmax_heads_bytes, split_attention
from .projection import project_qkv, rope_function, rotate_qk
from .registry import AttentionKind, ConvertedAttention, register_attention_kind
from .short_conv import ShortConv

# silu(1.2785) = 1.0000: the output gate's bias at the start.
OPEN_GATE_BIAS = 1.2785
# fla's GatedDeltaNet output norm epsilon.
NORM_EPS = 1e-5
# fla's chunk size: the PyTorch path's intra-chunk work is O(C^2) per chunk and head.
MAX_CHUNK = 64


@dataclass
class GdnOptions:
    """Settings of the `gdn` kind (`attention.options`).

    Attributes:
        output_gate: multiply each head's normalised output by silu(x W_g + b_g) (fla's `use_gate`).
        conv_kernel: kernel of a short causal conv on q/k/v before the rule; 0 for none.
        rope: rotate q/k with the teacher's RoPE before the l2 norm.
        dt_min, dt_max: range of the per-head decay rate at the start (-g per token).
    """

    output_gate: bool = True
    conv_kernel: int = 0
    rope: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        if self.conv_kernel < 0 or not 0 < self.dt_min <= self.dt_max:
            raise LinearizeError(f"attention.options: conv_kernel must be >= 0 and 0 < dt_min <= dt_max, got {self}")


@dataclass(frozen=True)
class DeltaState:
    """Decoding state of one `gdn` layer; its size does not grow with the tokens seen.

    Attributes:
        recurrent: `[B, H, D, D]` fp32 delta-rule state (keys by values, fla's layout).
        conv: `[B, kernel - 1, C]` the short conv's last inputs (q, k, v side by side), or None without one.
    """

    recurrent: torch.Tensor
    conv: torch.Tensor | None = None

    def _map(self, fn) -> DeltaState:
        return DeltaState(fn(self.recurrent), fn(self.conv) if self.conv is not None else None)

    def index_select(self, indices: torch.Tensor) -> DeltaState:
        return self._map(lambda t: t.index_select(0, indices.to(t.device)))

    def repeat_interleave(self, repeats: int) -> DeltaState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device) -> DeltaState:
        return self._map(lambda t: t.to(device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.recurrent, *([self.conv] if self.conv is not None else [])]


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's output channels, one weight shared by the heads (fla's `o_norm`)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedDeltaAttention(ConvertedAttention):
    """Gated DeltaNet around a teacher's attention module.

    Args:
        original: the softmax attention module being replaced; its children are adopted.
        layer_idx: index of the decoder layer.
        options: the kind's settings.
        chunk_size: tokens per chunk of the PyTorch path.
        softmax_kv_heads: key/value heads kept as exact softmax over every past token, with their query heads.
    """

    def __init__(
        self,
        original: nn.Module,
        layer_idx: int,
        options: GdnOptions,
        chunk_size: int = 64,
        softmax_kv_heads: tuple[int, ...] = (),
    ):
        super().__init__(original, layer_idx)
        config = original.config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.options, self.chunk_size = original.head_dim, options, chunk_size
        self.scaling = original.scaling
        self.softcap = getattr(original, "attn_logit_softcapping", None)
        self.rope = rope_function(original)
        self.split = HeadSplit(self.num_heads, self.num_kv_heads, softmax_kv_heads)
        # The new parameters are the linear heads' (H of them, Hkv key/value heads); kept heads have none.
        H, Hkv = self.split.num_linear_heads, len(self.split.linear_kv)
        D, hidden = self.head_dim, config.hidden_size
        device = next(original.parameters()).device
        self.a_proj = nn.Linear(hidden, H, bias=False, device=device)
        self.A_log = nn.Parameter(torch.zeros(H, device=device))
        self.dt_bias = nn.Parameter(torch.zeros(H, device=device))
        self.b_proj = nn.Linear(hidden, H, bias=True, device=device)
        self.o_norm = HeadRMSNorm(D).to(device)
        if options.output_gate:
            self.g_proj = nn.Linear(hidden, H * D, bias=True, device=device)
        if options.conv_kernel and H:
            self.conv = ShortConv((H + 2 * Hkv) * D, options.conv_kernel).to(device)
        self.reset_new_parameters()
        self.float_new_parameters()

    def reset_new_parameters(self, names=None) -> None:
        """The start described in the module docstring; the teacher is not consulted."""
        names = list(self.named_new_parameters() if names is None else names)
        prefixes = {n.split(".", 1)[0] for n in names}
        opts = self.options
        with torch.no_grad():
            for linear in ("a_proj", "b_proj", "g_proj"):
                if linear in prefixes:
                    getattr(self, linear).weight.zero_()
            if "b_proj" in prefixes:
                self.b_proj.bias.zero_()
            if "g_proj" in prefixes:
                self.g_proj.bias.fill_(OPEN_GATE_BIAS)
            if "A_log" in prefixes:
                self.A_log.zero_()
            if "dt_bias" in prefixes:
                H = self.split.num_linear_heads
                spread = torch.linspace(0, 1, H) if H != 1 else torch.zeros(1)
                dt = torch.exp(math.log(opts.dt_min) + spread * (math.log(opts.dt_max) - math.log(opts.dt_min)))
                # softplus(dt_bias) = dt.
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        for module in ("o_norm", "conv"):
            if module in prefixes:
                getattr(self, module).reset_parameters()

    def linear_heads(self, hidden, position_embeddings, q, k, v, token_mask, state, output_final_state, cu_seqlens):
        """The gated delta rule on the linear heads' un-rotated q `[B, T, H, D]`, k and v `[B, T, Hkv, D]`
        (`split_attention`'s `LinearOp` once `hidden` and `position_embeddings` are bound): `(out, DeltaState)`."""
        H, Hkv, D = q.shape[2], k.shape[2], self.head_dim
        conv_state = None
        if hasattr(self, "conv"):
            x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
            x, conv_state = self.conv.packed(x, state.conv if state is not None else None, token_mask, cu_seqlens)
            q, k, v = (t.unflatten(-1, (-1, D)) for t in x.split([H * D, Hkv * D, Hkv * D], -1))
        if self.options.rope:
            q, k = rotate_qk(self, q, k, position_embeddings)
        x = hidden.to(self.a_proj.weight.dtype)
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        out, recurrent = delta_ops.gated_delta_rule(
            q, k, v, g, beta, initial_state=state.recurrent if state is not None else None, output_final_state=True,
            cu_seqlens=cu_seqlens, token_mask=token_mask, qk_l2norm=True, chunk_size=self.chunk_size,
        )  # fmt: skip
        out = self.o_norm(out)
        if hasattr(self, "g_proj"):
            out = out * F.silu(self.g_proj(x).float()).unflatten(-1, (H, D))
        return out.to(hidden.dtype), DeltaState(recurrent, conv_state)

    def attention_heads(self, hidden_states, position_embeddings, token_mask=None, cache=None, cu_seqlens=None):
        """Per-head attention output before `o_proj`: `[B, T, hidden]` -> `[B, T, H * D]`.

        `cu_seqlens` (`[N + 1]`) marks sequences packed along T (B = 1): each runs from an empty state, in one call.
        """
        cos, sin = position_embeddings
        # The projections with norms but no rotation (RoPE with cos 1, sin 0): the conv sees un-rotated q/k, and
        # the kept softmax heads get the teacher's rotation in `split_attention`.
        q, k, v = project_qkv(self, hidden_states, (torch.ones_like(cos), torch.zeros_like(sin)))
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        linear_op = partial(self.linear_heads, hidden_states, position_embeddings)
        rotate = partial(rotate_qk, self, position_embeddings=position_embeddings)
        out = split_attention(
            self.split, linear_op, q, k, v, self.scaling, self.softcap, token_mask, layer, cu_seqlens, rotate=rotate
        )
        return out.reshape(*hidden_states.shape[:-1], -1)

    def attention_weights(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        raise LinearizeError("the gdn kind has no attention-weight cross-entropy term: set the transfer stage's "
                             "xent_weight=0")  # fmt: skip

    def extra_repr(self) -> str:
        o = self.options
        heads = f", softmax_kv_heads={self.split.softmax_kv}" if self.split else ""
        return (
            f"layer_idx={self.layer_idx}, output_gate={o.output_gate}, conv_kernel={o.conv_kernel}, rope={o.rope}"
            f"{heads}"
        )


def gdn_state_bytes(config, cfg, layer_idx: int, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of a `gdn` layer's cache after `tokens` tokens: per linear query head the fp32 [D, D] state, plus the
    conv's last inputs of the linear heads; plus the kept softmax heads' keys, values and mask, which grow."""
    head_dim = config_head_dim(config)
    split = HeadSplit.of_layer(config, cfg, layer_idx)
    H, Hkv = split.num_linear_heads, len(split.linear_kv)
    kernel = cfg.kind_options().conv_kernel
    conv = max(kernel - 1, 0) * (H + 2 * Hkv) * head_dim * dtype_bytes
    linear = batch * (4 * H * head_dim * head_dim + conv) if H else 0
    return linear + softmax_heads_bytes(len(split.softmax_kv), head_dim, tokens, batch, dtype_bytes)


register_attention_kind(
    AttentionKind(
        name="gdn",
        description="Gated DeltaNet: the gated delta rule over l2-normalised teacher q/k, per-head decay and write "
        "strength from the layer input, output norm and gate (fla's GatedDeltaNet)",
        uses_window=False,
        build=lambda original, cfg, idx: GatedDeltaAttention(
            original,
            idx,
            cfg.kind_options(),
            chunk_size=min(cfg.chunk_size, MAX_CHUNK),
            softmax_kv_heads=cfg.softmax_heads.get(str(idx), ()),
        ),
        cache_layer=RecurrentLayer,
        ops={
            "gated_delta_rule": delta_ops.gated_delta_rule,
            "gated_delta_chunk_torch": delta_ops.gated_delta_chunk_torch,
            "naive": delta_ops.gated_delta_naive,
        },
        options=GdnOptions,
        state_bytes=gdn_state_bytes,
        softmax_heads=True,
    )
)
