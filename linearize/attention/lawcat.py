"""The `lawcat` kind (LAWCAT): a short causal depthwise conv on q/k/v, then normalised gated linear attention.

New parameters (stage 1 trains them): the conv's taps `conv.weight` (kernel 4 by default, identity start), the
Hedgehog feature maps of q and k and the low-rank gate, as in `gla`; at the start the layer equals `gla`'s. The conv
runs on the projections (after q/k norms, before RoPE). Decoding state: the gated sums and the conv's last
kernel - 1 inputs (`GatedState.conv`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LinearizeError
from .cache import RecurrentLayer
from .gated import gated_state_bytes
from .gla import GLA_OPS, GateOptions, build_gla
from .registry import AttentionKind, register_attention_kind


@dataclass
class LawcatOptions(GateOptions):
    """`gla`'s gate settings plus the conv's kernel size (LAWCAT: 4)."""

    conv_kernel: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.conv_kernel < 1:
            raise LinearizeError(f"attention.options.conv_kernel must be >= 1, got {self.conv_kernel}")


register_attention_kind(
    AttentionKind(
        name="lawcat",
        description="causal depthwise conv (kernel 4) on q/k/v, then normalised gated linear attention (LAWCAT)",
        uses_window=False,
        build=lambda original, cfg, idx: build_gla(original, cfg, idx, conv_kernel=cfg.kind_options().conv_kernel),
        cache_layer=RecurrentLayer,
        ops=GLA_OPS,
        options=LawcatOptions,
        state_bytes=lambda config, cfg, idx, tokens, batch, nbytes: gated_state_bytes(
            config,
            cfg,
            idx,
            tokens,
            batch,
            nbytes,
            features=2 * cfg.feature_dim,
            conv_kernel=cfg.kind_options().conv_kernel,
        ),  # fmt: skip
        softmax_heads=True,
    )
)
