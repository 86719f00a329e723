"""Head-level hybrids: some key/value heads of a converted layer keep exact softmax over every past token.

Retrieval is done by a few heads, so a layer can keep those heads exact and make the rest linear. The split is by
key/value head: the cache is per key/value head, so a kept head brings its whole group of query heads (GQA) with
it. The kept heads compute what the teacher computes (its projections, RoPE, scale and soft-cap; no new
parameters); the other heads run the kind's own op on their share of q, k and v; the outputs go back into the
original head order before `o_proj`. Any kind whose op works on a subset of whole head groups can reuse this:
`split_attention` takes the kind's op as a function. A kind whose op reads un-rotated q/k (a short conv before
RoPE, or no RoPE at all, as `gdn`) passes them so, with the teacher's rotation as `rotate` for the kept heads.

Decoding keeps a `SoftmaxHeadsState` in the layer's `RecurrentLayer`: the kind's own state for the linear heads
and a growing key/value cache for the kept heads only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LinearizeError

# (q, k, v, token_mask, initial_state, output_final_state, cu_seqlens) -> (out [B, T, H', Dv], state or None)
LinearOp = Callable[..., tuple[torch.Tensor, object]]


class HeadSplit:
    """Which query and key/value heads of a layer are exact softmax and which are the kind's linear op.

    Args:
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv; query head h reads key/value head `h // (H // Hkv)`.
        softmax_kv_heads: key/value heads kept as exact softmax (with their query heads).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, softmax_kv_heads: Sequence[int] = ()):
        bad = [h for h in softmax_kv_heads if not 0 <= h < num_kv_heads]
        if bad:
            raise LinearizeError(
                f"attention.softmax_heads has heads {bad}, but layers have kv heads 0..{num_kv_heads - 1}"
            )
        groups = num_heads // num_kv_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.softmax_kv = sorted(set(softmax_kv_heads))
        self.linear_kv = [j for j in range(num_kv_heads) if j not in self.softmax_kv]
        self.softmax_q = [h for j in self.softmax_kv for h in range(j * groups, (j + 1) * groups)]
        self.linear_q = [h for j in self.linear_kv for h in range(j * groups, (j + 1) * groups)]
        order = self.linear_q + self.softmax_q
        # Position in the concatenation [linear heads, softmax heads] of each original head.
        self.restore = sorted(range(num_heads), key=lambda h: order[h])
        self._indices: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def of_layer(cls, config, attention, layer_idx: int) -> HeadSplit:
        """The split of layer `layer_idx` of a model `config` under the attention settings `attention`
        (its `softmax_heads`)."""
        kept = attention.softmax_heads.get(str(layer_idx), ())
        return cls(config.num_attention_heads, config.num_key_value_heads, kept)

    def __bool__(self) -> bool:
        return bool(self.softmax_kv)

    @property
    def num_linear_heads(self) -> int:
        return len(self.linear_q)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(linear q, linear kv, softmax q, softmax kv, restore) index tensors on `device`, made once."""
        if device not in self._indices:
            lists = (self.linear_q, self.linear_kv, self.softmax_q, self.softmax_kv, self.restore)
            self._indices[device] = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in lists)
        return self._indices[device]

    def __repr__(self) -> str:
        return f"softmax_kv_heads={self.softmax_kv}"


@dataclass(frozen=True)
class SoftmaxHeadsState:
    """Decoding state of a layer with kept softmax heads.

    Attributes:
        linear: the kind's state for the linear heads (e.g. `HybridState`); None when every head is softmax.
        keys: `[B, N, Hs, D]` keys (after RoPE) of every token seen, for the Hs kept key/value heads.
        values: `[B, N, Hs, Dv]` their values.
        mask: `[B, N]` bool, False for padding tokens (which no later token attends to).
    """

    linear: object | None
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def _map(self, fn, linear_fn) -> SoftmaxHeadsState:
        linear = linear_fn(self.linear) if self.linear is not None else None
        return SoftmaxHeadsState(linear, fn(self.keys), fn(self.values), fn(self.mask))

    def tensors(self) -> list[torch.Tensor]:
        own = [self.keys, self.values, self.mask]
        return (list(self.linear.tensors()) if self.linear is not None else []) + own

    def bytes_per_token(self) -> int:
        """Bytes the kept heads add per token seen (keys, values and mask of the whole batch)."""
        tokens = self.keys.shape[1]
        own = sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.mask))
        return own // tokens if tokens else 0

    def index_select(self, index: torch.Tensor) -> SoftmaxHeadsState:
        return self._map(lambda t: t.index_select(0, index.to(t.device)), lambda s: s.index_select(index))

    def repeat_interleave(self, repeats: int) -> SoftmaxHeadsState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0), lambda s: s.repeat_interleave(repeats))

    def to(self, device: torch.device) -> SoftmaxHeadsState:
        return self._map(lambda t: t.to(device), lambda s: s.to(device))


def _allowed(T: int, past: int, key_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """`[B or 1, 1, T, past + T]` bool: which keys each new query may attend to."""
    rows = torch.arange(T, device=device)[:, None] + past
    cols = torch.arange(past + T, device=device)[None, :]
    allowed = cols <= rows
    if cu_seqlens is not None:
        seq = torch.bucketize(torch.arange(T, device=device), cu_seqlens[1:].to(device), right=True)
        allowed = allowed & (seq[:, None] == seq[None, :])
    allowed = allowed[None, None]
    if key_mask is not None:
        # A padding query still sees itself, so no row is empty (an empty row would give NaN, and NaN values reach
        # the next layer's keys and values even where they are masked).
        allowed = (allowed & key_mask[:, None, None, :]) | (cols == rows)[None, None]
    return allowed


def causal_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    past: SoftmaxHeadsState | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Exact causal softmax attention of new tokens over the past ones and themselves (GQA).

    Args:
        q: `[B, T, H, D]` queries after RoPE.
        k: `[B, T, Hkv, D]` keys after RoPE; H is a multiple of Hkv.
        v: `[B, T, Hkv, Dv]`.
        scale: logit scale.
        softcap: optional logit soft-cap (Gemma 2).
        token_mask: `[B, T]` bool, False for padding tokens, which no query attends to.
        past: the keys, values and mask of earlier tokens; None starts from nothing.
        cu_seqlens: `[N + 1]` offsets of sequences packed along T (B = 1), which do not attend to each other.

    Returns:
        (`[B, T, H, Dv]` in the dtype of q, (keys, values, mask) of every token seen).
    """
    B, T = q.shape[:2]
    mask = token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
    if past is not None:
        k, v = torch.cat([past.keys, k], dim=1), torch.cat([past.values, v], dim=1)
        mask = torch.cat([past.mask, mask], dim=1)
    n_past = k.shape[1] - T
    plain = n_past == 0 and token_mask is None and cu_seqlens is None
    allowed = None if plain else _allowed(T, n_past, mask, cu_seqlens, q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap:
        kt = kt.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
        vt = vt.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
        logits = softcap * torch.tanh((qt.float() @ kt.float().transpose(-1, -2)) * scale / softcap)
        if allowed is None:
            allowed = _allowed(T, 0, None, None, q.device)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = (probs @ vt.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=allowed, is_causal=allowed is None, scale=scale, enable_gqa=True
        )
    return out.transpose(1, 2), (k, v, mask)


def split_attention(
    split: HeadSplit,
    linear_op: LinearOp,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    layer=None,
    cu_seqlens: torch.Tensor | None = None,
    rotate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Run the kept heads as exact softmax and the rest through `linear_op`, and put the heads back in order.

    Args:
        split: the layer's head split; with no softmax heads this is `linear_op` on every head.
        linear_op: the kind's op on a subset of whole head groups (see `LinearOp`).
        q, k, v: `[B, T, H, D]`, `[B, T, Hkv, D]`, `[B, T, Hkv, Dv]` after norms and RoPE.
        layer: the layer's `RecurrentLayer` when decoding with a cache (read and advanced here), else None.
        rotate: `(q, k) -> (q, k)`, the teacher's RoPE, applied to the kept heads' q/k alone; None when q and k
            come rotated.

    Returns:
        `[B, T, H, Dv]`.
    """
    state = layer.state if layer is not None else None
    keep_state = layer is not None
    if not split:
        out, new_state = linear_op(q, k, v, token_mask, state, keep_state, cu_seqlens)
    else:
        lin_q, lin_kv, sm_q, sm_kv, restore = split.indices(q.device)
        parts, linear_state = [], None
        if split.num_linear_heads:
            out, linear_state = linear_op(
                q.index_select(2, lin_q),
                k.index_select(2, lin_kv),
                v.index_select(2, lin_kv),
                token_mask,
                state.linear if state is not None else None,
                keep_state,
                cu_seqlens,
            )
            parts.append(out)
        sq, sk = q.index_select(2, sm_q), k.index_select(2, sm_kv)
        if rotate is not None:
            sq, sk = rotate(sq, sk)
        out, (keys, values, mask) = causal_softmax(
            sq,
            sk,
            v.index_select(2, sm_kv),
            scale,
            softcap,
            token_mask,
            state,
            cu_seqlens,
        )
        parts.append(out)
        out = torch.cat(parts, dim=2).index_select(2, restore)
        new_state = SoftmaxHeadsState(linear_state, keys, values, mask) if keep_state else None
    if layer is not None:
        layer.advance(new_state, q.shape[1])
    return out


def split_weights(
    split: HeadSplit, linear_weights: Callable, q: torch.Tensor, k: torch.Tensor, scale: float, softcap=None
) -> torch.Tensor:
    """Attention weights `[B, H, T, T]`: the kind's (`linear_weights(q, k)`) for the linear heads, exact causal
    softmax for the kept heads."""
    if not split:
        return linear_weights(q, k)
    from .selection import _causal_probs

    lin_q, lin_kv, sm_q, sm_kv, restore = split.indices(q.device)
    parts = [linear_weights(q.index_select(2, lin_q), k.index_select(2, lin_kv))] if split.num_linear_heads else []
    parts.append(_causal_probs(q.index_select(2, sm_q), k.index_select(2, sm_kv), scale, softcap))
    return torch.cat([p.float() for p in parts], dim=1).index_select(1, restore)


def config_head_dim(config) -> int:
    """A model config's attention head size (`head_dim`, else hidden size over query heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes(kv_heads: int, head_dim: int, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of keys and values of `kv_heads` heads over `tokens` tokens (plus the padding mask kept beside the kept
    heads' cache when `mask` is wanted, see `softmax_heads_bytes`)."""
    return 2 * kv_heads * head_dim * tokens * batch * dtype_bytes


def softmax_heads_bytes(kv_heads: int, head_dim: int, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Bytes a `SoftmaxHeadsState` holds for its kept heads after `tokens` tokens: keys, values, a bool mask."""
    if not kv_heads:
        return 0
    return kv_cache_bytes(kv_heads, head_dim, tokens, batch, dtype_bytes) + tokens * batch
