"""The converted attention module of the Hedgehog family: linear attention, optionally with an exact window.

`hedgehog` (hedgehog.py) is this module with window 0; `lolcats` (lolcats.py) is it with a window (64 by default)
and a learned per-head window weight. The module keeps the teacher's projections under their original names and
adds only the feature maps and the window factors. Its decoding state is a `HybridState` (linear state plus the
last W-1 raw keys/values) kept in a `RecurrentLayer` of the cache; with a sparse cache (`sparse_cache` K > 0, LoLA:
the K past pairs per key/value head that the linear state recalls worst stay exact beside the window) it is a
`SparseState` and the op is `sparse_hybrid_attention`; with `sparse_scorer="learned"` a small network
(`eviction.TokenScorer`, a new parameter) adds its score to the recall error's log. Key/value heads listed in
`softmax_kv_heads` keep exact softmax over every token (heads.py); the feature maps and window factors cover the
other heads only.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..kernels.hybrid import (
    hybrid_attention,
    hybrid_attention_chunked,
    hybrid_attention_varlen,
    hybrid_attention_weights,
)
from ..kernels.hybrid.sparse import sparse_hybrid_attention
from .eviction import TokenScorer
from .feature_maps import HedgehogFeatureMap
from .heads import HeadSplit, split_attention, split_weights
from .projection import project_qkv, rope_function, rotate_qk
from .registry import PACKED_KWARG, TOKEN_MASK_KWARG, Control, ConvertedAttention  # noqa: F401


class HybridLinearAttention(ConvertedAttention):
    """Drop-in replacement for a decoder's softmax attention module.

    Args:
        original: the softmax attention module being replaced; its children (projections, q/k norms) are adopted.
        config: the model config (head counts, head size).
        layer_idx: index of the decoder layer.
        feature_dim: Hedgehog feature dimension F.
        window: exact-softmax window in tokens (current token included); 0 for plain linear attention.
        init_window_factor: initial logit of the per-head window weight.
        chunk_size: tokens per chunk on the PyTorch path.
        softmax_kv_heads: key/value heads kept as exact softmax over every past token, with their query heads.
        sparse_cache: past pairs per linear key/value head kept exact beside the window (0: none); the evaluation
            may change it on a loaded model (it adds no parameters).
        sparse_block: tokens between updates of the kept pairs (None: the window).
        sparse_scorer: how the kept pairs are chosen: "recall" (LoLA's recall error, no parameters) or "learned"
            (the log recall error plus the score of a `TokenScorer` over the linear key/value heads, trained with
            the feature maps).
    """

    def __init__(
        self,
        original: nn.Module,
        config,
        layer_idx: int,
        feature_dim: int,
        window: int,
        init_window_factor: float = -2.1972,
        chunk_size: int = 128,
        softmax_kv_heads: tuple[int, ...] = (),
        sparse_cache: int = 0,
        sparse_block: int | None = None,
        sparse_scorer: str = "recall",
    ):
        super().__init__(original, layer_idx)
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.softcap = getattr(original, "attn_logit_softcapping", None)
        self.rope = rope_function(original)
        self.window = window
        self.feature_dim = feature_dim
        self.init_window_factor = init_window_factor
        self.chunk_size = chunk_size
        self.sparse_cache = sparse_cache
        self.sparse_block = sparse_block
        # Evaluation controls switch the linear branch off (window-only); training never does.
        self.use_linear = True
        self.split = HeadSplit(self.num_heads, self.num_kv_heads, softmax_kv_heads)
        # Kept softmax heads have no feature maps and no window weight: nothing of theirs can train.
        n_linear = self.split.num_linear_heads
        ref = next(original.parameters())
        self.feature_map_q = HedgehogFeatureMap(n_linear, self.head_dim, feature_dim).to(ref.device, ref.dtype)
        self.feature_map_k = HedgehogFeatureMap(n_linear, self.head_dim, feature_dim).to(ref.device, ref.dtype)
        if window > 0:
            self.window_factors = nn.Parameter(torch.empty(n_linear, device=ref.device, dtype=ref.dtype))
        self.token_scorer = None
        if sparse_scorer == "learned" and n_linear:
            # Scores from each token's key before RoPE and its value (head size D each).
            n_kv = len(self.split.linear_kv)
            self.token_scorer = TokenScorer(n_kv, 2 * self.head_dim, device=ref.device, dtype=ref.dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deterministic start: identity feature maps and window weight sigmoid(init_window_factor)."""
        self.reset_new_parameters()

    def reset_new_parameters(self, names=None) -> None:
        """Identity feature maps and window weight sigmoid(init_window_factor); the teacher is not consulted."""
        names = set(self.named_new_parameters() if names is None else names)
        if "feature_map_q.weight" in names:
            self.feature_map_q.reset_parameters()
        if "feature_map_k.weight" in names:
            self.feature_map_k.reset_parameters()
        if "window_factors" in names:
            with torch.no_grad():
                self.window_factors.fill_(self.init_window_factor)
        if any(n.startswith("token_scorer.") for n in names):
            self.token_scorer.reset_parameters()

    def named_new_parameters(self) -> dict[str, nn.Parameter]:
        """The feature maps, with a window the per-head window weight, with learned eviction the token scorer
        (what attention transfer trains)."""
        named = {"feature_map_q.weight": self.feature_map_q.weight, "feature_map_k.weight": self.feature_map_k.weight}
        if self.window > 0:
            named["window_factors"] = self.window_factors
        if self.token_scorer is not None:
            named.update({f"token_scorer.{n}": p for n, p in self.token_scorer.named_parameters()})
        return named

    def _sparse(self) -> bool:
        return self.use_linear and self.sparse_cache > 0 and self.window > 0

    def attention_heads(
        self, hidden_states: torch.Tensor, position_embeddings, token_mask=None, cache=None, cu_seqlens=None
    ):
        """Per-head attention output before `o_proj`: `[B, T, hidden]` -> `[B, T, H * Dv]`.

        This is what attention transfer matches against the teacher's per-head outputs. `cu_seqlens` (`[N + 1]`)
        marks sequences packed along T (B = 1) that must not attend to each other.
        """
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        linear_op, rotate = self.linear_heads, None
        if self.token_scorer is not None and self._sparse():
            # The scorer reads keys before RoPE: q and k come unrotated, each branch rotates its own heads.
            rotate = partial(rotate_qk, self, position_embeddings=position_embeddings)
            linear_op = partial(self.linear_heads, rotate=rotate)
        q, k, v = project_qkv(self, hidden_states, position_embeddings, rotate=rotate is None)
        out = split_attention(
            self.split, linear_op, q, k, v, self.scaling, self.softcap, token_mask, layer, cu_seqlens, rotate
        )
        return out.reshape(*hidden_states.shape[:-1], -1)

    def linear_heads(self, q, k, v, token_mask, initial_state, output_final_state: bool, cu_seqlens, rotate=None):
        """The hybrid op on the linear heads' q `[B, T, H', D]`, k and v `[B, T, H'kv, D]`: `(out, state)`.
        `rotate` (learned eviction) is the RoPE still to apply to q and k, after the scorer has read k."""
        sizes = dict(chunk_size=self.chunk_size)
        if self._sparse():
            # The controls switch a branch off and run the plain op: the kept pairs belong to neither branch alone.
            op = partial(sparse_hybrid_attention, cu_seqlens=cu_seqlens)
            sizes = dict(cache_size=self.sparse_cache, block=self.sparse_block)
            if rotate is not None:
                sizes.update(scorer=self.token_scorer, score_x=torch.cat([k, v], dim=-1))
                q, k = rotate(q, k)
        elif self.use_linear:
            # The dispatcher takes packed sequences itself, so that the Triton kernels get them in one row.
            op = partial(hybrid_attention, cu_seqlens=cu_seqlens)
        else:
            op = partial(hybrid_attention_chunked, linear=False)
            if cu_seqlens is not None:
                op = partial(hybrid_attention_varlen, op, cu_seqlens=cu_seqlens)
        out, state = op(
            q,
            k,
            v,
            self.feature_map_q.weight,
            self.feature_map_k.weight,
            self.window_factors if self.window > 0 else None,
            window=self.window,
            scale=self.scaling,
            softcap=self.softcap,
            token_mask=token_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            **sizes,
        )
        return out, state

    def attention_weights(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Normalised attention weights `[B, H, T, T]` of this layer (quadratic; for the transfer cross-entropy)."""
        q, k, _ = project_qkv(self, hidden_states, position_embeddings)
        linear_weights = partial(
            hybrid_attention_weights,
            wq=self.feature_map_q.weight,
            wk=self.feature_map_k.weight,
            window_factor=self.window_factors if self.window > 0 else None,
            window=self.window,
            scale=self.scaling,
            softcap=self.softcap,
        )
        return split_weights(self.split, linear_weights, q, k, self.scaling, self.softcap)

    def extra_repr(self) -> str:
        heads = f", softmax_kv_heads={self.split.softmax_kv}" if self.split else ""
        sparse = f", sparse_cache={self.sparse_cache}, sparse_block={self.sparse_block}" if self.sparse_cache else ""
        if self.token_scorer is not None:
            sparse += ", sparse_scorer=learned"
        return f"layer_idx={self.layer_idx}, window={self.window}, feature_dim={self.feature_dim}{heads}{sparse}"


def _window_only(module: HybridLinearAttention):
    module.use_linear = False

    def restore():
        module.use_linear = True

    return restore


def _linear_only(module: HybridLinearAttention):
    window, module.window = module.window, 0

    def restore():
        module.window = window

    return restore


def _has_window(module: HybridLinearAttention) -> bool:
    return module.window > 0


# The two branches of a windowed module, each switched off in turn by the evaluation controls.
WINDOW_CONTROLS = {
    "window-only": Control("sliding-window softmax alone (linear branch off)", _has_window, _window_only),
    "linear-only": Control("the trained feature maps over every token (window off)", _has_window, _linear_only),
}
