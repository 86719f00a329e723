"""The hybrid op with a bounded sparse cache beside the window (LoLA): PyTorch prefill and decoding.

Linear attention recalls some past tokens badly; LoLA keeps those few key/value pairs exact. For query i of a key/
value head with kept set S (at most K positions, all older than the window):

    exact terms  a_ij = g * exp(s_ij - m_i)      for i - W < j <= i and for j in S,  m_i the max over both
    linear terms l_ij = phi_q(q_i) . phi_k(k_j)  for every other real j <= i - W
    y_i = (sum_j a_ij v_j + sum_j l_ij v_j) / (sum_j a_ij + sum_j l_ij + eps)

S changes only at block boundaries, after the token at position t with (t + 1) % C == 0 (positions count the
row's slots from the start of the sequence, padding included, so prefill and decoding agree). Its candidates are S
plus the tokens that left the window since the previous boundary; each candidate j is scored by its self-recall
error against the linear state of the linear tokens that are no candidate, summed over the query heads of the
group: ||v_j - (phi_q(k_j) . Sum) / (phi_q(k_j) . z + eps)||^2. The K largest errors are kept (ties: the later
position); the rest become linear. Selection runs without gradients; the op is differentiable given it.

Learned eviction (`scorer`, after "Contextualized Learnable Token Eviction"): a small network gives each token a
score from its own scorer input x_j (the layer passes its key before RoPE and its value) and those of its
neighbours up to `scorer.margin` positions away on either side, all seen when j leaves the window (margin < W).
Candidates are ranked by log(recall error) + score instead of the recall error alone, so a scorer that outputs 0
(as the layer's starts) chooses as LoLA does. The forward is the same function of the selection; the gradient
reaches the scores straight through the kept pairs: with s_j = sigmoid(score_j), the value of a kept pair enters
the exact terms as v_j * (1 + s_j - sg(s_j)) (sg: stop-gradient), equal to v_j, so d loss / d s_j says whether
the pair helps as an exact term. The state keeps `margin` more raw tokens, their scorer inputs and the kept
pairs' scores.

The prefill loops over blocks of C tokens: per block the exact part over the keys in range plus the K kept, the
linear part from the state at the block start plus the intra-block linear terms, then the boundary update.
Decoding is the same code with T = 1. `sparse_naive.py` is the token-by-token ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common import run_packed
from .naive import EPS, hedgehog_feature_map, repeat_kv, softcap_scores

# The smallest recall error the learned ranking takes the log of.
TINY = 1e-30


@dataclass
class SparseState:
    """Decoding state of a layer with a sparse cache.

    Attributes:
        kv: `[B, H, 2F, Dv]` fp32, sum of phi_k(k_j) v_j^T over the linear tokens up to the last boundary's frontier.
        ksum: `[B, H, 2F]` fp32, sum of phi_k(k_j) over the same tokens.
        tail_k: `[B, C + W - 2, Hkv, D]` raw keys of the tokens after that frontier (those that left the window
            since, then the last W - 1), oldest first, right-aligned.
        tail_v: `[B, C + W - 2, Hkv, Dv]` their values.
        tail_mask: `[B, C + W - 2]` bool, True where the slot holds a real token.
        cache_k: `[B, Hkv, K, D]` the kept keys, by position.
        cache_v: `[B, Hkv, K, Dv]` their values.
        cache_pos: `[B, Hkv, K]` int64 positions of the kept tokens, -1 for an empty slot (empty slots last).
        seen: tokens (row slots) seen so far.
        tail_x: `[B, slots, Hkv, E]` the tail tokens' scorer inputs (learned eviction; None otherwise). With a
            scorer the tail also keeps the `margin` tokens before the frontier, the past neighbours of the next
            candidates.
        cache_score: `[B, Hkv, K]` fp32 scores of the kept pairs (learned eviction; None otherwise).
    """

    kv: torch.Tensor
    ksum: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_mask: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    cache_pos: torch.Tensor
    seen: int = 0
    tail_x: torch.Tensor | None = None
    cache_score: torch.Tensor | None = None

    @classmethod
    def zeros(
        cls, batch, heads, kv_heads, head_dim, v_dim, features, window, cache_size, block, dtype, device,
        margin=0, score_dim=0,
    ):  # fmt: skip
        slots = block + window - 2 + margin
        scored = dict(
            tail_x=torch.zeros(batch, slots, kv_heads, score_dim, dtype=dtype, device=device),
            cache_score=torch.zeros(batch, kv_heads, cache_size, device=device),
        )
        return cls(
            kv=torch.zeros(batch, heads, features, v_dim, device=device),
            ksum=torch.zeros(batch, heads, features, device=device),
            tail_k=torch.zeros(batch, slots, kv_heads, head_dim, dtype=dtype, device=device),
            tail_v=torch.zeros(batch, slots, kv_heads, v_dim, dtype=dtype, device=device),
            tail_mask=torch.zeros(batch, slots, dtype=torch.bool, device=device),
            cache_k=torch.zeros(batch, kv_heads, cache_size, head_dim, dtype=dtype, device=device),
            cache_v=torch.zeros(batch, kv_heads, cache_size, v_dim, dtype=dtype, device=device),
            cache_pos=torch.full((batch, kv_heads, cache_size), -1, dtype=torch.long, device=device),
            **(scored if score_dim else {}),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the state (the scorer's two only with learned eviction)."""
        scored = () if self.tail_x is None else (self.tail_x, self.cache_score)
        return (self.kv, self.ksum, self.tail_k, self.tail_v, self.tail_mask, self.cache_k, self.cache_v,
                self.cache_pos, *scored)  # fmt: skip

    @classmethod
    def _of(cls, tensors, seen: int) -> SparseState:
        return cls(*tensors[:8], seen, *tensors[8:])

    def _map(self, fn) -> SparseState:
        return SparseState._of([fn(t) for t in self.tensors()], self.seen)

    def index_select(self, index: torch.Tensor) -> SparseState:
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> SparseState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device) -> SparseState:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(states: list[SparseState]) -> SparseState:
        """States of separate sequences as one batch (their `seen` may differ: the first one's is kept)."""
        parts = zip(*(s.tensors() for s in states), strict=True)
        return SparseState._of([torch.cat(p) for p in parts], states[0].seen)


def recall_errors(cand_k, cand_v, kv, ksum, wq, groups):
    """`[B, Hkv, N]` self-recall error of each candidate against the linear state, summed over the group's heads."""
    B, Hkv, N, _ = cand_k.shape
    with torch.no_grad():
        keys = cand_k.repeat_interleave(groups, dim=1).transpose(1, 2)
        phi = hedgehog_feature_map(keys, wq).transpose(1, 2)
        vhat = torch.einsum("bhcf,bhfd->bhcd", phi, kv) / (torch.einsum("bhcf,bhf->bhc", phi, ksum)[..., None] + EPS)
        err = (cand_v.float().repeat_interleave(groups, dim=1) - vhat).pow(2).sum(-1)
        return err.view(B, Hkv, groups, N).sum(2)


def _select(score, cand_pos, cache_size):
    """Indices `[B, Hkv, K]` of the kept candidates: highest `score` first, the later position on ties."""
    with torch.no_grad():
        score = score.masked_fill(cand_pos < 0, float("-inf"))
        # Later positions first, then a stable sort by score: equal scores keep the later position in front.
        by_pos = torch.sort(cand_pos, dim=-1, descending=True, stable=True).indices
        by_err = torch.sort(score.gather(-1, by_pos), dim=-1, descending=True, stable=True).indices
        chosen = by_pos.gather(-1, by_err[..., :cache_size])
        # Kept slots in position order, empty ones last, so that every path builds the same state.
        pos = cand_pos.gather(-1, chosen)
        order = torch.sort(torch.where(pos < 0, torch.iinfo(pos.dtype).max, pos), dim=-1, stable=True).indices
        return chosen.gather(-1, order)


def _gather(x, idx):
    """`x[b, h, idx[b, h, i]]` for `x` of shape `[B, Hkv, N, ...]`."""
    shape = (*idx.shape, *x.shape[3:])
    return x.gather(2, idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(shape))


def sparse_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    window_factor: torch.Tensor,
    window: int,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    initial_state: SparseState | None = None,
    output_final_state: bool = False,
    cache_size: int = 64,
    block: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    score_x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SparseState | None]:
    """Hybrid attention with a sparse cache over a block of new tokens, continuing from `initial_state`.

    Args:
        q: `[B, T, H, D]` queries after RoPE.
        k: `[B, T, Hkv, D]` keys after RoPE.
        v: `[B, T, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights.
        window_factor: `[H]` logits of the exact terms' weight.
        window: W >= 1, the exact-softmax window (current token included).
        scale: softmax scale.
        softcap: optional logit soft-cap.
        token_mask: `[B, T]` bool, False for padding tokens, which take part in nothing and are never kept.
        initial_state: state after the previous tokens; None starts from empty.
        output_final_state: return the state after these tokens.
        cache_size: K, positions kept exact per key/value head (0: none, the plain op up to rounding).
        block: C >= 1, tokens between updates of the kept set (None: the window).
        cu_seqlens: `[N + 1]` offsets of N sequences packed along T (B = 1), each run on its own.
        scorer: learned eviction: `(x [B, N, Hkv, E], ok [B, N]) -> [B, N, Hkv]` fp32 scores, each from the
            inputs of the token and of its neighbours up to `scorer.margin` (< W) positions away, inputs where `ok`
            is False counting as zeros; None selects by recall error (LoLA).
        score_x: `[B, T, Hkv, E]` the new tokens' scorer inputs (with `scorer`).

    Returns:
        (`[B, T, H, Dv]` in the dtype of q, final state or None).
    """
    block = block or window
    if cu_seqlens is not None:
        return run_packed(
            lambda parts, init: sparse_hybrid_attention(
                *parts[:3], wq, wk, window_factor, window, scale, softcap, parts[3], init, output_final_state,
                cache_size, block, scorer=scorer, score_x=parts[4],
            ),
            (q, k, v, token_mask, score_x), initial_state, output_final_state, cu_seqlens,
            take=lambda state, n: state.index_select(torch.tensor([n])), join=SparseState.cat,
        )  # fmt: skip

    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    groups = H // Hkv
    device = q.device
    margin = scorer.margin if scorer is not None else 0
    state = initial_state or SparseState.zeros(
        B, H, Hkv, D, Dv, 2 * wq.shape[-1], window, cache_size, block, k.dtype, device,
        margin=margin, score_dim=score_x.shape[-1] if scorer is not None else 0,
    )  # fmt: skip
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    slots, p0 = state.tail_k.shape[1], state.seen
    # Index x of the concatenated keys holds position p0 - slots + x.
    keys = torch.cat([state.tail_k, k], dim=1)
    values = torch.cat([state.tail_v, v], dim=1)
    key_ok = torch.cat([state.tail_mask, token_mask], dim=1)
    phi_k = hedgehog_feature_map(repeat_kv(keys, groups), wk) * key_ok[:, :, None, None]
    phi_q = hedgehog_feature_map(q, wq)
    vr = repeat_kv(values, groups).float()
    score, lift, cache_lift = None, None, None
    if scorer is not None:
        xs = torch.cat([state.tail_x, score_x], dim=1)
        score = scorer(xs, key_ok)
        s = torch.sigmoid(score)
        lift = s - s.detach()  # zero, with the gradient of s
        cache_lift = torch.zeros_like(state.cache_score)
    g = torch.sigmoid(window_factor.float())[None, :, None, None]
    kv, ksum = state.kv, state.ksum
    cache_k, cache_v, cache_pos, cache_score = state.cache_k, state.cache_v, state.cache_pos, state.cache_score

    outputs, start, end = [], p0, p0 + T
    while start < end:
        stop = min((start // block + 1) * block, end)
        frontier = start // block * block - window
        lo, hi = frontier + 1 - (p0 - slots), stop - (p0 - slots)
        qi = torch.arange(start, stop, device=device)[:, None]
        kj = torch.arange(frontier + 1, stop, device=device)[None, :]
        ok = key_ok[:, lo:hi]
        pq = phi_q[:, start - p0 : stop - p0]

        lin = torch.einsum("bihf,bjhf->bhij", pq, phi_k[:, lo:hi]) * (kj <= qi - window)
        num = torch.einsum("bhij,bjhd->bihd", lin, vr[:, lo:hi]) + torch.einsum("bihf,bhfd->bihd", pq, kv)
        den = lin.sum(-1).transpose(1, 2) + torch.einsum("bihf,bhf->bih", pq, ksum)

        qf = q[:, start - p0 : stop - p0].float()
        scores = torch.einsum("bihd,bjhd->bhij", qf, repeat_kv(keys[:, lo:hi], groups).float())
        kept_k = cache_k.repeat_interleave(groups, dim=1).float()
        scores = softcap_scores(torch.cat([scores, torch.einsum("bihd,bhcd->bhic", qf, kept_k)], -1) * scale, softcap)
        in_window = (((kj <= qi) & (kj > qi - window))[None, None] & ok[:, None, None, :]).expand(-1, H, -1, -1)
        in_cache = (cache_pos >= 0).repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, stop - start, -1)
        exact = torch.cat([in_window, in_cache], dim=-1)
        scores = scores.masked_fill(~exact, torch.finfo(scores.dtype).min)
        a = torch.exp(scores - scores.amax(-1, keepdim=True)) * exact * g
        n_win = hi - lo
        kept_v = cache_v.float() if cache_lift is None else cache_v.float() * (1 + cache_lift[..., None])
        num = num + torch.einsum("bhij,bjhd->bihd", a[..., :n_win], vr[:, lo:hi])
        num = num + torch.einsum("bhic,bhcd->bihd", a[..., n_win:], kept_v.repeat_interleave(groups, dim=1))
        den = den + a.sum(-1).transpose(1, 2)
        outputs.append((num / (den[..., None] + EPS)).to(q.dtype))

        if stop % block == 0:
            pend = slice(lo, lo + block)
            kv, ksum, cache_k, cache_v, cache_pos, cache_score, cache_lift = _boundary(
                keys[:, pend], values[:, pend], ok[:, :block], frontier, kv, ksum,
                cache_k, cache_v, cache_pos, wq, wk, groups,
                None if score is None else (score[:, pend], lift[:, pend], cache_score, cache_lift),
            )  # fmt: skip
        start = stop

    out = torch.cat(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, Dv)
    if not output_final_state:
        return out, None
    frontier = end // block * block - window
    tail_mask = (
        key_ok[:, -slots:] & (torch.arange(end - slots, end, device=device) > frontier - margin)
        if slots
        else key_ok[:, :0]
    )
    fill = tail_mask[:, :, None, None]
    tail_k, tail_v = keys[:, keys.shape[1] - slots :] * fill, values[:, values.shape[1] - slots :] * fill
    scored = ()
    if scorer is not None:
        scored = (xs[:, xs.shape[1] - slots :] * fill, cache_score)
    return out, SparseState._of((kv, ksum, tail_k, tail_v, tail_mask, cache_k, cache_v, cache_pos, *scored), end)


def _boundary(pend_k, pend_v, pend_ok, frontier, kv, ksum, cache_k, cache_v, cache_pos, wq, wk, groups, learned):
    """The update after a boundary token: choose the kept set among the kept and the `C` tokens that left the window
    since the last boundary (positions frontier + 1 ..), and fold the others into the linear state.

    `learned` is None (select by recall error) or `(pend_score, pend_lift, cache_score, cache_lift)`: the scores
    added to the log recall errors and their straight-through terms (see the module docstring)."""
    B, C, Hkv, _ = pend_k.shape
    K = cache_k.shape[2]
    pos = torch.arange(frontier + 1, frontier + 1 + C, device=pend_k.device)
    pend_pos = torch.where(pend_ok & (pos >= 0), pos, -1)[:, None, :].expand(B, Hkv, C)
    cand_k = torch.cat([cache_k, pend_k.transpose(1, 2)], dim=2)
    cand_v = torch.cat([cache_v, pend_v.transpose(1, 2)], dim=2)
    cand_pos = torch.cat([cache_pos, pend_pos], dim=2)
    err = recall_errors(cand_k, cand_v, kv, ksum, wq, groups)
    if learned is None:
        chosen = _select(err, cand_pos, K)
    else:
        pend_score, pend_lift, cache_score, cache_lift = learned
        cand_score = torch.cat([cache_score, pend_score.transpose(1, 2)], dim=2)
        cand_lift = torch.cat([cache_lift, pend_lift.transpose(1, 2)], dim=2)
        chosen = _select(err.clamp_min(TINY).log() + cand_score.detach(), cand_pos, K)
    fold = (cand_pos >= 0).scatter(2, chosen, False)
    phi = hedgehog_feature_map(cand_k.repeat_interleave(groups, dim=1).transpose(1, 2), wk).transpose(1, 2)
    phi = phi * fold.repeat_interleave(groups, dim=1)[..., None]
    kv = kv + torch.einsum("bhcf,bhcd->bhfd", phi, cand_v.float().repeat_interleave(groups, dim=1))
    ksum = ksum + phi.sum(2)
    kept_pos = cand_pos.gather(2, chosen)
    # Empty slots hold zeros, whatever padding token the selection passed over.
    full = (kept_pos >= 0)[..., None]
    kept = (_gather(cand_k, chosen) * full, _gather(cand_v, chosen) * full, kept_pos)
    if learned is None:
        return kv, ksum, *kept, None, None
    return kv, ksum, *kept, cand_score.gather(2, chosen) * full[..., 0], cand_lift.gather(2, chosen) * full[..., 0]
