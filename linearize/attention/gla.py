"""The `gla` kind: gated linear attention with a per-channel forget gate from the layer input (fla's GLA gate).

New parameters (stage 1 trains them): the Hedgehog feature maps of q and k (`feature_map_q/k.weight`, identity
start, as `hedgehog`) and the low-rank gate `gate.down/up` (g = logsigmoid(x W_down W_up + b) / tau, W_up zero and
b = 6 at the start, so the gate starts near 1 and the layer starts as the `hedgehog` kind: the teacher's
linear-attention approximation). The teacher's q/k/v/o, norms and RoPE are kept. Decoding state: the gated
[K, V + 1] sums (`GatedState.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LinearizeError
from ..kernels import gla as gla_ops
from .cache import RecurrentLayer
from .gated import GatedAttention, gated_state_bytes
from .gates import LowRankGate
from .heads import HeadSplit
from .registry import AttentionKind, register_attention_kind

# The ops every gated kind calls: the dispatcher (fla on CUDA), the PyTorch path, the truth.
GLA_OPS = {
    "gated_linear_attention": gla_ops.gated_linear_attention,
    "gla_chunk_torch": gla_ops.gla_chunk_torch,
    "naive": gla_ops.gla_naive,
}
# Tokens per chunk of the PyTorch GLA path at most: its intra-chunk decays take O(T * C * K) memory.
MAX_CHUNK = 64


@dataclass
class GateOptions:
    """Settings of a learned low-rank gate (`attention.options`).

    Attributes:
        gate_rank: inner width of the gate's low-rank projection (fla: 16).
        gate_tau: temperature dividing the log gate (fla: 16).
    """

    gate_rank: int = 16
    gate_tau: float = 16.0

    def __post_init__(self):
        if self.gate_rank < 1 or self.gate_tau <= 0:
            raise LinearizeError(f"attention.options: gate_rank must be >= 1 and gate_tau > 0, got {self}")


def build_gla(original, cfg, layer_idx: int, conv_kernel: int = 0) -> GatedAttention:
    opts = cfg.kind_options()
    split = HeadSplit.of_layer(original.config, cfg, layer_idx)
    gate = LowRankGate(original.config.hidden_size, split.num_linear_heads, 2 * cfg.feature_dim, opts.gate_rank,
                       opts.gate_tau)  # fmt: skip
    return GatedAttention(original, layer_idx, gate, feature="hedgehog", feature_dim=cfg.feature_dim,
                          conv_kernel=conv_kernel, chunk_size=min(cfg.chunk_size, MAX_CHUNK),
                          softmax_kv_heads=split.softmax_kv)  # fmt: skip


register_attention_kind(
    AttentionKind(
        name="gla",
        description="gated linear attention: Hedgehog features, a low-rank per-channel forget gate from the layer "
        "input, normalised (fla's GLA)",
        uses_window=False,
        build=build_gla,
        cache_layer=RecurrentLayer,
        ops=GLA_OPS,
        options=GateOptions,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: gated_state_bytes(
            config, cfg, idx, tokens, batch, nbytes, features=2 * cfg.feature_dim
        ),
        softmax_heads=True,
    )
)
