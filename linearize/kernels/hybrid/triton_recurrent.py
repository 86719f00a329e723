"""Triton decode step of the hybrid op: one new token per sequence against a `HybridState`.

One program per (batch, query head, block of Dv) reads the linear state once, scores the query against the W - 1
carried keys and the new one, writes the output and the new linear state (the token that leaves the window folded
in), and the first query head of each KV group also writes its share of the shifted window (oldest slot dropped, new
token appended). The whole step is one launch: decoding is bound by host overhead, so the wrapper allocates the
outputs and launches, nothing else. The state is returned as new tensors, like the PyTorch path, so a state can be
reused (beam search, retries).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from .naive import EPS as _EPS_VALUE
from .torch_chunked import HybridState
from .triton_common import FP_FUSION, _heads, _soft_cap

# Kernels read globals only as constexpr.
EPS = tl.constexpr(_EPS_VALUE)


def _empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Every buffer the kernel fully overwrites comes from here; the tests swap in a NaN-filled allocation."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _feature_map_vec(x, w_ptr, h, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    wmask = (od[:, None] < D) & (of[None, :] < F)
    w = tl.load(w_ptr + h * D * F + od[:, None] * F + of[None, :], mask=wmask, other=0.0).to(tl.float32)
    proj = tl.sum(x[:, None] * w, 0)
    fm = of < F
    pp = tl.where(fm, proj, float("-inf"))
    ep = tl.exp(pp - tl.max(pp, 0))
    pn = tl.where(fm, -proj, float("-inf"))
    en = tl.exp(pn - tl.max(pn, 0))
    return ep / tl.sum(ep, 0), en / tl.sum(en, 0)


@triton.jit
def _softcap(s, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        s = _soft_cap(s, softcap)
    return s


@triton.jit
def _decode_kernel(
    q, k, v, wq, wk, wf, tm, tm_stride, kv, ksum, o, kv_new, ksum_new,
    win_k, win_v, win_m, win_k_new, win_v_new, win_m_new,
    scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BS: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = _heads(bh, H, HKV)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    ov = iv * BV + tl.arange(0, BV)
    dm = od < D
    vm = ov < DV
    fm = of < F
    qv = tl.load(q + bh * D + od, mask=dm, other=0.0).to(tl.float32)
    k_raw = tl.load(k + (b * HKV + hk) * D + od, mask=dm, other=0.0)
    v_raw = tl.load(v + (b * HKV + hk) * DV + ov, mask=vm, other=0.0)
    kn = k_raw.to(tl.float32)
    vn = v_raw.to(tl.float32)
    ok_new = tl.full([], 1, tl.int1)
    if HAS_MASK:
        ok_new = tl.load(tm + b * tm_stride) != 0
    phq_p, phq_n = _feature_map_vec(qv, wq, h, D, F, BD, BF)

    smask = fm[:, None] & vm[None, :]
    st = (bh * 2 * F + of[:, None]).to(tl.int64) * DV + ov[None, :]
    kv_p = tl.load(kv + st, mask=smask, other=0.0)
    kv_n = tl.load(kv + st + F * DV, mask=smask, other=0.0)
    z_p = tl.load(ksum + bh * 2 * F + of, mask=fm, other=0.0)
    z_n = tl.load(ksum + bh * 2 * F + F + of, mask=fm, other=0.0)
    num = tl.sum(phq_p[:, None] * kv_p, 0) + tl.sum(phq_n[:, None] * kv_n, 0)
    den = tl.sum(phq_p * z_p, 0) + tl.sum(phq_n * z_n, 0)

    if W == 0:
        # No window: the new token is on the linear side at once, and enters the state.
        pk_p, pk_n = _feature_map_vec(kn, wk, h, D, F, BD, BF)
        pk_p = tl.where(ok_new, pk_p, 0.0)
        pk_n = tl.where(ok_new, pk_n, 0.0)
        lin = tl.sum(phq_p * pk_p, 0) + tl.sum(phq_n * pk_n, 0)
        num += lin * vn
        den += lin
        leave_p, leave_n, v_leave = pk_p, pk_n, vn
    else:
        g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
        s_new = _softcap(tl.sum(qv * kn, 0) * scale, softcap, SOFTCAP)
        s_new = tl.where(ok_new, s_new, float("-inf"))
        m = s_new
        if W > 1:
            os_ = tl.arange(0, BS)
            sm = os_ < W - 1
            wrow = (b * (W - 1) + os_).to(tl.int64) * HKV + hk
            kw = tl.load(win_k + wrow[:, None] * D + od[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
            vw = tl.load(win_v + wrow[:, None] * DV + ov[None, :], mask=sm[:, None] & vm[None, :], other=0.0)
            okw = sm & (tl.load(win_m + b * (W - 1) + os_, mask=sm, other=0) != 0)
            s_w = _softcap(tl.sum(kw.to(tl.float32) * qv[None, :], 1) * scale, softcap, SOFTCAP)
            s_w = tl.where(okw, s_w, float("-inf"))
            m = tl.maximum(m, tl.max(s_w, 0))

            # The shifted window: slot s of the new one is slot s + 1 of the old, the new token goes last. One
            # program writes each element: the first query head of the KV group, keys and mask from the first
            # block of Dv (the mask from KV head 0 alone), values from every block for its columns.
            if h % (H // HKV) == 0:
                last = (b * (W - 1) + W - 2).to(tl.int64) * HKV + hk
                shifted = sm & (os_ > 0)
                if iv == 0:
                    kdst = win_k_new + (wrow - HKV)[:, None] * D + od[None, :]
                    tl.store(kdst, kw, mask=shifted[:, None] & dm[None, :])
                    tl.store(win_k_new + last * D + od, k_raw.to(win_k_new.dtype.element_ty), mask=dm)
                    if hk == 0:
                        tl.store(win_m_new + b * (W - 1) + os_ - 1, okw, mask=shifted)
                        tl.store(win_m_new + b * (W - 1) + W - 2, ok_new)
                vdst = win_v_new + (wrow - HKV)[:, None] * DV + ov[None, :]
                tl.store(vdst, vw, mask=shifted[:, None] & vm[None, :])
                tl.store(win_v_new + last * DV + ov, v_raw.to(win_v_new.dtype.element_ty), mask=vm)
        m = tl.where(m == float("-inf"), 0.0, m)
        a_new = tl.where(ok_new, g * tl.exp(s_new - m), 0.0)
        num += a_new * vn
        den += a_new
        if W > 1:
            a_w = tl.where(okw, g * tl.exp(s_w - m), 0.0)
            num += tl.sum(a_w[:, None] * vw.to(tl.float32), 0)
            den += tl.sum(a_w, 0)
            # The oldest carried token leaves the window.
            k0 = tl.load(win_k + (b * (W - 1) * HKV + hk) * D + od, mask=dm, other=0.0).to(tl.float32)
            ok0 = tl.load(win_m + b * (W - 1)) != 0
            v_leave = tl.load(win_v + (b * (W - 1) * HKV + hk) * DV + ov, mask=vm, other=0.0).to(tl.float32)
        else:
            k0 = kn
            ok0 = ok_new
            v_leave = vn
        leave_p, leave_n = _feature_map_vec(k0, wk, h, D, F, BD, BF)
        leave_p = tl.where(ok0, leave_p, 0.0)
        leave_n = tl.where(ok0, leave_n, 0.0)

    tl.store(o + bh * DV + ov, (num / (den + EPS)).to(o.dtype.element_ty), mask=vm)
    tl.store(kv_new + st, kv_p + leave_p[:, None] * v_leave[None, :], mask=smask)
    tl.store(kv_new + st + F * DV, kv_n + leave_n[:, None] * v_leave[None, :], mask=smask)
    if iv == 0:
        tl.store(ksum_new + bh * 2 * F + of, z_p + leave_p, mask=fm)
        tl.store(ksum_new + bh * 2 * F + F + of, z_n + leave_n, mask=fm)


# Columns of the state per program (all of Dv up to 128, so the feature maps are computed once per query head) and
# warps per program: the fastest of BV in 16..128 x 1..8 warps on an H100 at B=16, H=32, Hkv=8, D=Dv=128, F=64, W=64
# (41 us in a CUDA graph, against 46 us for BV=64 and 48 us for BV=32 with 2 warps, despite 264 bytes of spills).
BLOCK_V = 128
NUM_WARPS = 4


@cache
def _blocks(D: int, Dv: int, F: int, slots: int) -> tuple[int, int, int, int]:
    """(BD, BV, BF, BS) for these dimensions, computed once per shape."""
    return (
        max(16, triton.next_power_of_2(D)),
        min(max(16, triton.next_power_of_2(Dv)), BLOCK_V),
        max(16, triton.next_power_of_2(F)),
        max(16, triton.next_power_of_2(max(slots, 1))),
    )


def hybrid_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    window_factor: torch.Tensor | None,
    window: int,
    scale: float,
    softcap: float | None = None,
    token_mask: torch.Tensor | None = None,
    initial_state: HybridState | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """One decoding step; equal to `hybrid_attention_chunked` with T = 1 and `output_final_state=True`.

    Args:
        q: `[B, 1, H, D]`.
        k: `[B, 1, Hkv, D]`.
        v: `[B, 1, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights.
        window_factor: `[H]` logits of the window-term weight; ignored when `window == 0`.
        window: exact-softmax window (any size: the step reads the W - 1 carried tokens directly).
        scale: softmax scale of the window scores.
        softcap: optional logit soft-cap of the window scores.
        token_mask: `[B, 1]` bool, False for padding.
        initial_state: state after the previous tokens; None starts from empty.

    Returns:
        (`[B, 1, H, Dv]` output in the dtype of `q`, the new `HybridState`). Not differentiable.
    """
    # Host time is most of a step's time: one launch, and allocations only for what it writes. `.contiguous()` is free
    # on the contiguous tensors a decoder passes; arguments the kernel never reads are None; the constexprs go
    # positionally (Triton's launcher binds keyword arguments more slowly).
    B, T, H, D = q.shape
    if T != 1:
        raise ValueError(f"hybrid_decode_triton takes one token per sequence, got T={T}")
    Hkv, Dv, F = k.shape[2], v.shape[3], wq.shape[2]
    slots = window - 1 if window > 1 else 0
    device = q.device
    state = initial_state or HybridState.zeros(B, H, Hkv, D, Dv, 2 * F, window, k.dtype, device)
    win_k, win_v, win_m = state.win_k, state.win_v, state.win_mask
    if win_k.shape[1] != slots:
        raise ValueError(f"initial_state holds {win_k.shape[1]} window slots, expected {slots}")
    BD, BV, BF, BS = _blocks(D, Dv, F, slots)
    o = _empty(B, 1, H, Dv, dtype=q.dtype, device=device)
    kv_new = _empty(B, H, 2 * F, Dv, device=device)
    ksum_new = _empty(B, H, 2 * F, device=device)
    if slots:
        win_k, win_v, win_m = win_k.contiguous(), win_v.contiguous(), win_m.contiguous()
        new_k = _empty(B, slots, Hkv, D, dtype=win_k.dtype, device=device)
        new_v = _empty(B, slots, Hkv, Dv, dtype=win_v.dtype, device=device)
        new_m = _empty(B, slots, dtype=torch.bool, device=device)
        window_args = (win_k, win_v, win_m, new_k, new_v, new_m)
    else:
        # No carried slots: the (empty) window tensors pass through untouched.
        new_k, new_v, new_m = win_k, win_v, win_m
        window_args = (None,) * 6
    _decode_kernel[(triton.cdiv(Dv, BV), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), wq.contiguous(), wk.contiguous(),
        window_factor if window > 0 else None, token_mask, 0 if token_mask is None else token_mask.stride(0),
        state.kv.contiguous(), state.ksum.contiguous(), o, kv_new, ksum_new, *window_args,
        float(scale), float(softcap or 0.0),
        H, Hkv, D, Dv, F, window, BD, BV, BF, BS, token_mask is not None, bool(softcap), num_warps=NUM_WARPS,
        **FP_FUSION,
    )  # fmt: skip
    return o, HybridState(kv_new, ksum_new, new_k, new_v, new_m)
