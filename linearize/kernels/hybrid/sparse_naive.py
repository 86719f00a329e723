"""Ground truth for the hybrid op with a bounded sparse cache beside the window (LoLA's design).

Token by token, per key/value head, in fp32, with the sets of exact and linear keys built explicitly for every
query; slow on purpose. The fast path (`sparse.py`) is tested against it on outputs, final states and gradients.

The op (see `sparse.py` for the full statement): each key/value head keeps a set S of at most K past positions,
older than the window, whose terms are exact like the window's (g * exp(s_ij - m_i), m_i the max over window and
S); every other token older than the window is linear. S changes only after a token t with (t + 1) % C == 0: the
candidates (S plus the tokens that left the window since the previous such boundary) are scored by their
self-recall error against the linear state of the other linear tokens, and the K worst recalled are kept. With a
learned scorer the K highest log(recall error) + score are kept, each token scored once from the whole sequence's
scorer inputs, and a kept pair's value carries the straight-through term of `sparse.py`: v_j (1 + s_j - sg(s_j)).
"""

from __future__ import annotations

import math

import torch

from .naive import EPS, hedgehog_feature_map, repeat_kv, softcap_scores
from .sparse import TINY, SparseState


def _recall_errors(cands, frontier, S, mask_b, phi_kq, phi_k, vr, heads, b):
    """Self-recall error of each candidate position against the linear tokens that are no candidate."""
    linear = [j for j in range(frontier + 1) if mask_b[j] and j not in cands and j not in S]
    errors = {}
    for j in cands:
        total = 0.0
        for h in heads:
            if linear:
                state = torch.einsum("jf,jd->fd", phi_k[b, linear, h], vr[b, linear, h])
                z = phi_k[b, linear, h].sum(0)
                vhat = (phi_kq[b, j, h] @ state) / (phi_kq[b, j, h] @ z + EPS)
            else:
                vhat = torch.zeros_like(vr[b, j, h])
            total += (vr[b, j, h] - vhat).pow(2).sum().item()
        errors[j] = total
    return errors


def sparse_hybrid_attention_naive(
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
    cache_size: int = 0,
    block: int | None = None,
    scorer=None,
    score_x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SparseState]:
    """Quadratic, token-by-token reference of the sparse-cache hybrid op, from an empty state.

    Args:
        q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask: as `hybrid_attention_naive`; window >= 1.
        cache_size: K, positions kept exact per key/value head.
        block: C, tokens between two updates of the kept set (None: the window).
        scorer, score_x: learned eviction, as in `sparse_hybrid_attention` (None: select by recall error).

    Returns:
        (`[B, T, H, Dv]` in the dtype of q, the final `SparseState` with its kept keys ordered by position).
    """
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    groups = H // Hkv
    block = block or window
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    kr, vr = repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
    phi_q = hedgehog_feature_map(q, wq)
    phi_k = hedgehog_feature_map(repeat_kv(k, groups), wk)
    with torch.no_grad():
        phi_kq = hedgehog_feature_map(repeat_kv(k, groups), wq)
    g = torch.sigmoid(window_factor.float())
    mask = token_mask.tolist()
    score = lift = None
    if scorer is not None:
        score = scorer(score_x, token_mask)  # [B, T, Hkv]
        s = torch.sigmoid(score)
        lift = s - s.detach()
    kept = [[set() for _ in range(Hkv)] for _ in range(B)]
    rows = []
    for b in range(B):
        steps = []
        for t in range(T):
            heads_out = []
            for h in range(H):
                S = kept[b][h // groups]
                exact = [j for j in range(max(0, t - window + 1), t + 1) if mask[b][j]] + sorted(S)
                linear = [j for j in range(t - window + 1) if mask[b][j] and j not in S]
                num = torch.zeros(Dv, device=q.device)
                den = torch.zeros((), device=q.device)
                v_exact, v_lin = vr[b, exact, h], vr[b, linear, h]
                if lift is not None:
                    up = torch.tensor([j in S for j in exact], device=q.device)
                    v_exact = v_exact * (1 + lift[b, exact, h // groups] * up)[:, None]
                if exact:
                    s = softcap_scores(kr[b, exact, h] @ q[b, t, h].float() * scale, softcap)
                    a = g[h] * torch.exp(s - s.max())
                    num, den = num + a @ v_exact, den + a.sum()
                if linear:
                    lin = phi_k[b, linear, h] @ phi_q[b, t, h]
                    num, den = num + lin @ v_lin, den + lin.sum()
                heads_out.append(num / (den + EPS))
            steps.append(torch.stack(heads_out))
            if (t + 1) % block:
                continue
            frontier = t - window + 1
            with torch.no_grad():
                for kvh in range(Hkv):
                    S = kept[b][kvh]
                    pending = [j for j in range(max(frontier - block + 1, 0), frontier + 1) if mask[b][j]]
                    cands = sorted(S | set(pending))
                    heads = range(kvh * groups, (kvh + 1) * groups)
                    err = _recall_errors(set(cands), frontier, S, mask[b], phi_kq, phi_k, vr, heads, b)
                    if score is not None:
                        err = {j: math.log(max(e, TINY)) + score[b, j, kvh].item() for j, e in err.items()}
                    ranked = sorted(cands, key=lambda j: (err[j], j), reverse=True)
                    kept[b][kvh] = set(ranked[:cache_size])
        rows.append(torch.stack(steps) if steps else q.new_zeros(0, H, Dv, dtype=torch.float32))
    out = torch.stack(rows).to(q.dtype)
    margin = scorer.margin if scorer is not None else 0
    state = _final_state(k, v, phi_k, vr, token_mask, kept, window, block, cache_size, groups, margin)
    if scorer is not None:
        state.tail_x = _tail(score_x, token_mask, T, block, window, margin)[0]
        state.cache_score = torch.stack([
            torch.stack([torch.cat([score[b, sorted(kept[b][h]), h], score.new_zeros(cache_size - len(kept[b][h]))])
                         for h in range(Hkv)])
            for b in range(B)
        ])  # fmt: skip
    return out, state


def _tail(x, token_mask, T, block, window, margin):
    """The last `slots` positions of `x` `[B, T, Hkv, E]`, oldest first, and their mask: real where a token is
    there and past the frontier (less `margin`)."""
    frontier = T // block * block - window
    slots = block + window - 2 + margin
    pos = torch.arange(T - slots, T, device=x.device)
    idx = pos.clamp_min(0)
    mask = token_mask[:, idx] & (pos >= 0) & (pos > frontier - margin)
    return x[:, idx] * mask[:, :, None, None], mask


def _final_state(k, v, phi_k, vr, token_mask, kept, window, block, cache_size, groups, margin=0) -> SparseState:
    B, T, Hkv, D = k.shape
    H, Dv, F2 = phi_k.shape[2], v.shape[-1], phi_k.shape[-1]
    frontier = T // block * block - window
    kv = torch.zeros(B, H, F2, Dv, device=k.device)
    ksum = torch.zeros(B, H, F2, device=k.device)
    cache_k = k.new_zeros(B, Hkv, cache_size, D)
    cache_v = v.new_zeros(B, Hkv, cache_size, Dv)
    cache_pos = torch.full((B, Hkv, cache_size), -1, dtype=torch.long, device=k.device)
    kv_rows, ksum_rows, ck_rows, cv_rows = [], [], [], []
    for b in range(B):
        kv_heads, ksum_heads = [], []
        for h in range(H):
            S = kept[b][h // groups]
            linear = [j for j in range(frontier + 1) if token_mask[b, j] and j not in S]
            kv_heads.append(kv[b, h] + phi_k[b, linear, h].T @ vr[b, linear, h])
            ksum_heads.append(ksum[b, h] + phi_k[b, linear, h].sum(0))
        kv_rows.append(torch.stack(kv_heads))
        ksum_rows.append(torch.stack(ksum_heads))
        ck_heads, cv_heads = [], []
        for kvh in range(Hkv):
            S = sorted(kept[b][kvh])
            pad = cache_size - len(S)
            ck_heads.append(torch.cat([k[b, S, kvh], cache_k[b, kvh, :pad]]))
            cv_heads.append(torch.cat([v[b, S, kvh], cache_v[b, kvh, :pad]]))
            cache_pos[b, kvh, : len(S)] = torch.tensor(S, dtype=torch.long)
        ck_rows.append(torch.stack(ck_heads))
        cv_rows.append(torch.stack(cv_heads))
    tail_k, tail_mask = _tail(k, token_mask, T, block, window, margin)
    tail_v = _tail(v, token_mask, T, block, window, margin)[0]
    return SparseState(
        torch.stack(kv_rows), torch.stack(ksum_rows), tail_k, tail_v, tail_mask,
        torch.stack(ck_rows), torch.stack(cv_rows), cache_pos, T,
    )  # fmt: skip
