"""The `rwkv7` kind (RADLADS / ARWKV): RWKV-7's delta-rule recurrence over the teacher's own projections.

The teacher's q/k/v/o, q/k norms and RoPE are kept: q becomes RWKV-7's receptance r, the rotated k its key, v its
value (keys and values shared out to the query heads under GQA, as RADLADS does). Per query head and channel:

    w   = -exp(-1/2) * sigmoid(w0 + tanh(x W_w1) W_w2)            log decay, in (-0.61, 0)
    icl = sigmoid(a0 + x W_a1 W_a2)                                in-context learning rate
    kk  = normalise(k * k_k) per head;  k <- k * (1 + (icl - 1) * k_a)
    S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T,   a = -kk, b = kk * icl,   o_t = S_t r_t
    out = GroupNorm_heads(o) * (sigmoid(x W_g1) W_g2 + 1)         before the teacher's o_proj

(`kernels/rwkv7`, fla's `chunk_rwkv7` on CUDA). As in RADLADS there is no token shift and no bonus term; RWKV-7's
value residual across layers is left out, so each converted layer depends on its own input only.

New parameters (stage 1 trains them): the three low-rank maps (`decay`, `iclr`, `gate`: down random, up zero, so
each starts at its bias for every token), `k_k` (0.85), `k_a` (1) and the per-head norm's `norm_weight` and
`norm_bias` (0). The norm's weight starts as RWKV-7's, ((layer + 1) / layers) ** 0.7: the per-head outputs of a
pretrained teacher grow with depth alike (on SmolLM2-135M from 0.03 to 0.7 in rms), where a weight of 1 would
start every layer 5 to 30 times louder than the teacher. The decay bias w0 follows RADLADS's schedule over the
channels (half-lives from about 6 tokens to about 760, more slow ones in later layers); icl starts at 0.5 and the
output gate at 1. Decoding state: the `[H, K, V]` fp32 state (`GatedState.linear`), whatever the number of tokens
seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LinearizeError
from ..kernels import rwkv7 as rwkv7_ops
from ..kernels.gla.naive import expand_heads
from .cache import RecurrentLayer
from .gated import GatedState
from .heads import config_head_dim
from .projection import project_qkv, rope_function
from .registry import AttentionKind, ConvertedAttention, register_attention_kind

# RWKV-7's bound on the log decay: w = -exp(-1/2) * sigmoid(.), a decay of at least exp(-0.61) = 0.55 per step.
MAX_LOG_DECAY = math.exp(-0.5)
# Tokens per chunk of the PyTorch path at most: its intra-chunk decays take O(T * C * K) memory.
MAX_CHUNK = 32


def default_rank(width: int, exponent: float, factor: float) -> int:
    """RADLADS's rule for its low-rank widths: round(factor * width ** exponent) to a multiple of 32, at least 32."""
    return max(1, round(factor * width**exponent / 32)) * 32


@dataclass
class Rwkv7Options:
    """Settings of the `rwkv7` kind (`attention.options`); a rank of 0 takes RADLADS's rule from the hidden size.

    Attributes:
        decay_rank: inner width of the decay's low-rank map (RADLADS: 1.8 sqrt(hidden), 32 on SmolLM2-135M).
        iclr_rank: inner width of the in-context learning rate's map (RADLADS: 1.8 sqrt(hidden)).
        gate_rank: inner width of the output gate's map (RADLADS: 0.6 hidden^0.8, 96 on SmolLM2-135M).
        output_gate: multiply the normalised output by the low-rank gate (RADLADS does).
    """

    decay_rank: int = 0
    iclr_rank: int = 0
    gate_rank: int = 0
    output_gate: bool = True

    def __post_init__(self):
        if min(self.decay_rank, self.iclr_rank, self.gate_rank) < 0:
            raise LinearizeError(f"attention.options: the rwkv7 ranks must be >= 0 (0: RADLADS's rule), got {self}")


class LowRank(nn.Module):
    """y = up(act(down(x))) + bias: `down` random, `up` zero, so y starts at `bias` for every input.

    Args:
        width: input width.
        rank: inner width.
        out: output width.
        act: the nonlinearity between the two maps (`tanh`, `sigmoid` or None).
    """

    def __init__(self, width: int, rank: int, out: int, act=None):
        super().__init__()
        self.act = act
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=True)

    def reset_parameters(self, bias: torch.Tensor | float) -> None:
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=self.down.in_features**-0.5)
            self.up.weight.zero_()
            if isinstance(bias, torch.Tensor):
                self.up.bias.copy_(bias)
            else:
                self.up.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.down(x)
        return self.up(self.act(inner) if self.act is not None else inner)


def decay_schedule(channels: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """RADLADS's start of w0 per channel: from -6.5 (slow: a half-life near 760 tokens) at the first channel to
    -1.5 at the last (about 6 tokens), with more slow channels in later layers."""
    depth = layer_idx / max(num_layers - 1, 1)
    n = torch.arange(channels, dtype=torch.float32) / max(channels - 1, 1)
    return -7.0 + 5.0 * n ** (0.85 + depth**0.5) + 0.5


class Rwkv7Attention(ConvertedAttention):
    """RWKV-7 time mixing around a teacher's attention module (see the module docstring).

    Args:
        original: the softmax attention module being replaced; its children are adopted.
        layer_idx: index of the decoder layer.
        options: `Rwkv7Options`.
        chunk_size: tokens per chunk of the PyTorch path.
    """

    def __init__(self, original: nn.Module, layer_idx: int, options: Rwkv7Options, chunk_size: int = 32):
        super().__init__(original, layer_idx)
        config = original.config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = original.head_dim, original.scaling
        self.num_layers = config.num_hidden_layers
        self.rope = rope_function(original)
        self.chunk_size, self.output_gate = chunk_size, options.output_gate
        hidden, channels = config.hidden_size, self.num_heads * self.head_dim
        ranks = (
            options.decay_rank or default_rank(hidden, 0.5, 1.8),
            options.iclr_rank or default_rank(hidden, 0.5, 1.8),
            options.gate_rank or default_rank(hidden, 0.8, 0.6),
        )
        ref = next(original.parameters())
        self.decay = LowRank(hidden, ranks[0], channels, torch.tanh).to(ref.device)
        self.iclr = LowRank(hidden, ranks[1], channels).to(ref.device)
        if self.output_gate:
            self.gate = LowRank(hidden, ranks[2], channels, torch.sigmoid).to(ref.device)
        self.k_k = nn.Parameter(torch.empty(channels, device=ref.device))
        self.k_a = nn.Parameter(torch.empty(channels, device=ref.device))
        self.norm_weight = nn.Parameter(torch.empty(channels, device=ref.device))
        self.norm_bias = nn.Parameter(torch.empty(channels, device=ref.device))
        self.reset_new_parameters()
        self.float_new_parameters()

    def reset_new_parameters(self, names=None) -> None:
        """RADLADS's start (see the module docstring); the teacher's weights are not consulted."""
        names = list(self.named_new_parameters() if names is None else names)
        prefixes = {n.split(".", 1)[0] for n in names}
        channels = self.num_heads * self.head_dim
        starts = {
            "decay": decay_schedule(channels, self.layer_idx, self.num_layers),
            "iclr": 0.0,
            "gate": 1.0,
            "k_k": 0.85,
            "k_a": 1.0,
            "norm_weight": ((self.layer_idx + 1) / self.num_layers) ** 0.7,
            "norm_bias": 0.0,
        }
        with torch.no_grad():
            for prefix in prefixes:
                start = starts[prefix]
                if isinstance(getattr(self, prefix), LowRank):
                    getattr(self, prefix).reset_parameters(start)
                else:
                    getattr(self, prefix).fill_(start)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def attention_heads(self, hidden_states, position_embeddings, token_mask=None, cache=None, cu_seqlens=None):
        """Per-head attention output before `o_proj`: `[B, T, hidden]` -> `[B, T, H * D]`.

        `cu_seqlens` (`[N + 1]`) marks sequences packed along T (B = 1): each runs from an empty state, in one call.
        """
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        state = layer.state.linear if layer is not None and layer.state is not None else None
        dtype = hidden_states.dtype
        r, k, v = project_qkv(self, hidden_states, position_embeddings)
        x = hidden_states.to(self.k_k.dtype)
        w = -MAX_LOG_DECAY * torch.sigmoid(self._heads(self.decay(x)))
        iclr = torch.sigmoid(self._heads(self.iclr(x)))
        k = expand_heads(k, self.num_heads).to(x.dtype)
        kk = F.normalize(k * self._heads(self.k_k), dim=-1)
        k = k * (1 + (iclr - 1) * self._heads(self.k_a))
        out, state = rwkv7_ops.rwkv7_attention(
            r, w, k.to(dtype), v, (-kk).to(dtype), (kk * iclr).to(dtype), scale=self.scaling, initial_state=state,
            output_final_state=layer is not None, cu_seqlens=cu_seqlens, token_mask=token_mask,
            chunk_size=min(self.chunk_size, MAX_CHUNK),
        )  # fmt: skip
        if layer is not None:
            layer.advance(GatedState(state), hidden_states.shape[1])
        # RWKV-7's per-head GroupNorm (eps 1e-5 per channel of the head, as RWKV-7 scales it).
        out = out.float()
        mean = out.mean(-1, keepdim=True)
        var = (out - mean).pow(2).mean(-1, keepdim=True)
        out = (out - mean) * torch.rsqrt(var + 1e-5 * self.head_dim)
        out = out * self._heads(self.norm_weight) + self._heads(self.norm_bias)
        if self.output_gate:
            out = out * self._heads(self.gate(x))
        return out.to(dtype).flatten(-2)

    def attention_weights(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        raise LinearizeError(
            "the rwkv7 kind has no attention-weight cross-entropy term: set the transfer stage's xent_weight=0"
        )

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, heads={self.num_heads}, head_dim={self.head_dim}"


def build_rwkv7(original, cfg, layer_idx: int) -> Rwkv7Attention:
    return Rwkv7Attention(original, layer_idx, cfg.kind_options(), chunk_size=cfg.chunk_size)


def rwkv7_state_bytes(config, cfg, layer_idx: int, tokens: int, batch: int, dtype_bytes: int) -> int:
    """One fp32 `[H, D, D]` state per sequence, whatever the number of tokens."""
    head_dim = config_head_dim(config)
    return batch * config.num_attention_heads * head_dim * head_dim * 4


register_attention_kind(
    AttentionKind(
        name="rwkv7",
        description="RWKV-7 delta-rule recurrence over the teacher's q/k/v/o with low-rank decay, in-context learning "
        "rate and output gate (RADLADS)",
        uses_window=False,
        build=build_rwkv7,
        cache_layer=RecurrentLayer,
        ops={
            "rwkv7_attention": rwkv7_ops.rwkv7_attention,
            "rwkv7_chunk_torch": rwkv7_ops.rwkv7_chunk_torch,
            "naive": rwkv7_ops.rwkv7_naive,
        },
        options=Rwkv7Options,
        state_bytes=rwkv7_state_bytes,
    )
)
