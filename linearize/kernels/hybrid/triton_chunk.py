"""Chunked Triton forward and backward of the hybrid op, for training and prefill.

The sequence is cut into chunks of `BLOCK_T` tokens. For a query in chunk c every key older than chunk c - 1 is on
the linear side (the window is at most `BLOCK_T` long), so the forward splits into

    1. a sequential pass per (batch, head, half of the features, block of Dv) that stores the linear state
       H_c = kv0 + sum phi_k(k_j) v_j^T over the keys older than chunk c - 1 (older than chunk c when W <= 1), and
       the final state. The halves softmax(x W) and softmax(-x W) of the feature map are independent sums, so they
       run as separate programs: more programs, each with half the serial work per chunk;
    2. one program per (chunk, batch, head) that adds phi_q . H_c to the exact scores against [chunk c - 1, chunk c],
       each pair going to the window term or to the linear term by its distance.

The feature map is fused: phi_q and phi_k are recomputed from q, k and the weights inside every kernel and never
written to memory. Products take their operands in the input type with fp32 accumulation (tf32x3 for fp32 inputs),
as a 16-bit model computes; the per-chunk states are stored in the input type, the final state in fp32. The backward mirrors the forward and, like flash-attention's, splits the gradient by side:

    1. `_delta_kernel`: delta = do . o per query row;
    2. the states are recomputed (pass 1 above), and a reverse pass sums the state gradients dH_c, dz_c of the
       query chunks after each key chunk (again one program per half of the features and block of Dv);
    3. `_bwd_q_kernel`, one program per (query chunk, batch, head): dq and the gradient of the q feature-map
       pre-activation, with the projection back through wq folded in. It also stores, per query row, the window's
       row maximum, its arg-max key and the maximum's gradient, and per chunk the window factor's partial gradient;
    4. `_bwd_kv_kernel`, one program per (key chunk, batch, head): it visits the (at most two) query chunks that
       see the key chunk through the window or intra-chunk terms (reusing the row maxima of step 3), adds the
       state gradient, and writes dk, dv (with
       the projection back through wk folded in) and the gradient of the k feature-map pre-activation. Each program
       owns its outputs, so nothing is written twice and no partial buffers are added afterwards (with GQA one
       torch sum over the group remains);
    5. `_wgrad_kernel`: the feature-map weight gradients x^T g as split-K partial products, summed by one torch op.

Keys of the window carried in `initial_state` sit at the negative positions -S..-1, in front of the new tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import EPS as _EPS_VALUE
from .torch_chunked import HybridState

# Kernels read globals only as constexpr.
EPS = tl.constexpr(_EPS_VALUE)
NO_KEY = tl.constexpr(-(2**30))

BLOCK_T = 64
# Warps per program of each kernel.
WARPS = {"phi": 4, "fwd_state": 4, "fwd_out": 4, "bwd_state": 4, "bwd_q": 4, "bwd_kv": 8, "wgrad": 4, "delta": 4}
# Query rows per program of the forward's output kernel and of the query-side backward, and per step of the
# key-side backward (divisors of BLOCK_T): fewer rows, smaller tiles beside the key chunks each one holds.
BQ_OUT = 64
BQ_Q = 64
BQ_KV = 32
# Columns of Dv per program of the sequential state passes.
BV_STATE = 64
MAX_DIM = 128


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_w(w_ptr, h, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    wmask = (od[:, None] < D) & (of[None, :] < F)
    return tl.load(w_ptr + h * D * F + od[:, None] * F + of[None, :], mask=wmask, other=0.0).to(tl.float32)


@triton.jit
def _proj(x, w_ptr, h, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    w = _load_w(w_ptr, h, D, F, BD, BF)
    # fp32 inputs keep near-fp32 accuracy (tf32x3); 16-bit inputs use the weights in their type, as a 16-bit model
    # would, with fp32 accumulation.
    if x.dtype == tl.float32:
        proj = tl.dot(x, w, input_precision="tf32x3")
    else:
        proj = tl.dot(x, w.to(x.dtype))
    return proj


@triton.jit
def _softmax_half(proj, sign, F: tl.constexpr, BF: tl.constexpr):
    # softmax(sign * proj) over the F real features; sign is +1 or -1 (negation is exact).
    fmask = (tl.arange(0, BF) < F)[None, :]
    pp = tl.where(fmask, proj * sign, float("-inf"))
    ep = tl.exp(pp - tl.max(pp, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None]


@triton.jit
def _feature_map(x, w_ptr, h, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    proj = _proj(x, w_ptr, h, D, F, BD, BF)
    return _softmax_half(proj, 1.0, F, BF), _softmax_half(proj, -1.0, F, BF)


@triton.jit
def _feature_map_bwd(phi_p, phi_n, dphi_p, dphi_n):
    # Gradient of the projection p from both halves: softmax(p) and softmax(-p). Linear in (dphi_p, dphi_n), so
    # the gradients of separate terms may be mapped one by one and summed.
    gp = phi_p * (dphi_p - tl.sum(dphi_p * phi_p, 1)[:, None])
    gn = phi_n * (dphi_n - tl.sum(dphi_n * phi_n, 1)[:, None])
    return gp - gn


@triton.jit
def _load_rows(x_ptr, win_ptr, b, hk, pos, T, S, c0, HKV: tl.constexpr, DX: tl.constexpr, BX: tl.constexpr,
               HAS_WIN: tl.constexpr):  # fmt: skip
    # Rows `pos`, columns c0.. of a [B, T, HKV, DX] tensor; negative positions read the carried window.
    offs = c0 + tl.arange(0, BX)
    dmask = (offs < DX)[None, :]
    in_seq = (pos >= 0) & (pos < T)
    rows = (b * T + pos).to(tl.int64) * HKV + hk
    x = tl.load(x_ptr + rows[:, None] * DX + offs[None, :], mask=in_seq[:, None] & dmask, other=0.0)
    if HAS_WIN:
        in_win = (pos < 0) & (pos >= -S)
        wrows = (b * S + S + pos).to(tl.int64) * HKV + hk
        x += tl.load(win_ptr + wrows[:, None] * DX + offs[None, :], mask=in_win[:, None] & dmask, other=0.0)
    return x


@triton.jit
def _key_ok(tm_ptr, wm_ptr, b, pos, T, S, HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr):
    ok = (pos >= 0) & (pos < T)
    if HAS_MASK:
        ok = ok & (tl.load(tm_ptr + b * T + pos, mask=ok, other=0) != 0)
    if HAS_WIN:
        in_win = (pos < 0) & (pos >= -S)
        ok = ok | (tl.load(wm_ptr + b * S + S + pos, mask=in_win, other=0) != 0)
    return ok


@triton.jit
def _phi_kernel(x, w, phi, T, H: tl.constexpr, HX: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):  # fmt: skip
    # phi[b, t, h] = [softmax(x W_h), softmax(-x W_h)] for x [B, T, HX, D] (head h reads x head h // (H / HX)),
    # in the type of x, for one chunk of one head.
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = c * BT + tl.arange(0, BT)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    rmask = pos < T
    xrow = (b * T + pos).to(tl.int64) * HX + h // (H // HX)
    xx = tl.load(x + xrow[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
    ph_p, ph_n = _feature_map(xx, w, h, D, F, BD, BF)
    prow = (b * T + pos).to(tl.int64) * H + h
    fmask = rmask[:, None] & (of[None, :] < F)
    tl.store(phi + prow[:, None] * 2 * F + of[None, :], ph_p.to(phi.dtype.element_ty), mask=fmask)
    tl.store(phi + prow[:, None] * 2 * F + F + of[None, :], ph_n.to(phi.dtype.element_ty), mask=fmask)


@triton.jit
def _load_phi(ph_ptr, phw_ptr, b, h, pos, T, S, f0, H: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
              HAS_WIN: tl.constexpr):  # fmt: skip
    # Features f0..f0 + F of the rows `pos` of a [B, T, H, 2F] feature tensor; negative positions read the carried
    # window's [B, S, H, 2F] features; rows outside both are zeros.
    of = tl.arange(0, BF)
    fmask = (of < F)[None, :]
    in_seq = (pos >= 0) & (pos < T)
    rows = (b * T + pos).to(tl.int64) * H + h
    x = tl.load(ph_ptr + rows[:, None] * 2 * F + f0 + of[None, :], mask=in_seq[:, None] & fmask, other=0.0)
    if HAS_WIN:
        in_win = (pos < 0) & (pos >= -S)
        wrows = (b * S + S + pos).to(tl.int64) * H + h
        x += tl.load(phw_ptr + wrows[:, None] * 2 * F + f0 + of[None, :], mask=in_win[:, None] & fmask, other=0.0)
    return x


@triton.jit
def _window_scores(q, kk, rows, pos, ok, scale, softcap, W: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    s = _mm(q, tl.trans(kk), PREC) * scale
    if SOFTCAP:
        # tanh through exp: the interpreter and every backend have it.
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    inside = (pos[None, :] <= rows[:, None]) & (pos[None, :] > rows[:, None] - W) & ok[None, :]
    return tl.where(inside, s, float("-inf")), inside


@triton.jit
def _out_grads(do, den_ptr, delta_ptr, qrow, rmask, c0, DV: tl.constexpr, BV: tl.constexpr, dt: tl.constexpr):
    # y = N / den: dN = do / den and d(den) = -do . y / den, for the rows `qrow` and columns c0.. of do. A row
    # without any key has den == EPS and sends nothing back (each of its terms has a zero factor); its 1 / den is
    # taken as 0 so that dN stays finite in fp16.
    ov = c0 + tl.arange(0, BV)
    dd = tl.load(do + qrow[:, None] * DV + ov[None, :], mask=rmask[:, None] & (ov[None, :] < DV), other=0.0)
    den = tl.load(den_ptr + qrow, mask=rmask, other=1.0)
    rden = tl.where(den > EPS, 1.0 / den, 0.0)
    dD = -tl.load(delta_ptr + qrow, mask=rmask, other=0.0) * rden
    dN = (dd.to(tl.float32) * rden[:, None]).to(dt)
    return dN, dD


@triton.jit
def _fwd_state_kernel(
    phk, phw, v, tm, win_v, win_m, kv0, z0, hkv, hz, kv_out, z_out,
    T, NT, S, SOUT,
    H: tl.constexpr, HKV: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    PREC: tl.constexpr, NITER: tl.constexpr,
):  # fmt: skip
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    half = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    of = tl.arange(0, BF)
    ov = iv * BV + tl.arange(0, BV)
    fm = of < F
    smask = fm[:, None] & (ov[None, :] < DV)
    f0 = half * F
    st = (bh * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
    if HAS_INIT:
        kv = tl.load(kv0 + st, mask=smask, other=0.0)
        z = tl.load(z0 + bh * 2 * F + f0 + of, mask=fm, other=0.0)
    else:
        kv = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
    # The interpreter of some Triton versions (3.6) cannot take a run-time loop bound: there NITER holds it.
    for i in range(NITER if NITER > 0 else NT + LAG):
        if i < NT:
            hst = ((bh * NT + i) * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
            tl.store(hkv + hst, kv.to(hkv.dtype.element_ty), mask=smask)
            if iv == 0:
                tl.store(hz + (bh * NT + i) * 2 * F + f0 + of, z, mask=fm)
        # Chunk i - LAG enters the state. Only keys older than the final window count towards the final state;
        # that bound never cuts into a chunk whose state was stored above.
        pos = (i - LAG) * BT + tl.arange(0, BT)
        ok = _key_ok(tm, win_m, b, pos, T, S, HAS_MASK, HAS_WIN) & (pos < T - SOUT)
        vv = _load_rows(v, win_v, b, hk, pos, T, S, iv * BV, HKV, DV, BV, HAS_WIN)
        phi = _load_phi(phk, phw, b, h, pos, T, S, f0, H, F, BF, HAS_WIN)
        phi = tl.where(ok[:, None], phi, 0.0)
        kv += _mm(tl.trans(phi), vv, PREC)
        z += tl.sum(phi.to(tl.float32), 0)
    if STORE_FINAL:
        tl.store(kv_out + st, kv, mask=smask)
        if iv == 0:
            tl.store(z_out + bh * 2 * F + f0 + of, z, mask=fm)


@triton.jit
def _fwd_out_kernel(
    q, k, v, phq, phk, phw, wf, tm, win_k, win_v, win_m, hkv, hz, o, den_out,
    T, NT, S, scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr, BQ: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Program i covers the BQ query rows from i * BQ on, in chunk c.
    i = tl.program_id(0)
    c = i // (BT // BQ)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    rows = i * BQ + tl.arange(0, BQ)
    rmask = rows < T
    ov = tl.arange(0, BV)
    of = tl.arange(0, BF)
    qrow = (b * T + rows).to(tl.int64) * H + h
    # Every product takes its operands in the input type (fp32 accumulation), as a 16-bit model would.
    phq_p = _load_phi(phq, phq, b, h, rows, T, S, 0, H, F, BF, False)
    phq_n = _load_phi(phq, phq, b, h, rows, T, S, F, H, F, BF, False)
    dt = phq_p.dtype

    # Keys older than the two chunks: through the stored state.
    smask = (of[:, None] < F) & (ov[None, :] < DV)
    hst = ((bh * NT + c) * 2 * F + of[:, None]).to(tl.int64) * DV + ov[None, :]
    h_p = tl.load(hkv + hst, mask=smask, other=0.0).to(dt)
    h_n = tl.load(hkv + hst + F * DV, mask=smask, other=0.0).to(dt)
    acc = _mm(phq_p, h_p, PREC) + _mm(phq_n, h_n, PREC)
    z_p = tl.load(hz + (bh * NT + c) * 2 * F + of, mask=of < F, other=0.0)
    z_n = tl.load(hz + (bh * NT + c) * 2 * F + F + of, mask=of < F, other=0.0)
    den = tl.sum(phq_p.to(tl.float32) * z_p[None, :], 1) + tl.sum(phq_n.to(tl.float32) * z_n[None, :], 1)

    # Keys of the current chunk.
    pos_c = c * BT + tl.arange(0, BT)
    v_c = _load_rows(v, win_v, b, hk, pos_c, T, S, 0, HKV, DV, BV, HAS_WIN)
    ok_c = _key_ok(tm, win_m, b, pos_c, T, S, HAS_MASK, HAS_WIN)
    pk_p = _load_phi(phk, phw, b, h, pos_c, T, S, 0, H, F, BF, HAS_WIN)
    pk_n = _load_phi(phk, phw, b, h, pos_c, T, S, F, H, F, BF, HAS_WIN)
    lin_c = (pos_c[None, :] <= rows[:, None] - W) & ok_c[None, :]
    p_c = tl.where(lin_c, _mm(phq_p, tl.trans(pk_p), PREC) + _mm(phq_n, tl.trans(pk_n), PREC), 0.0)
    if LAG:
        # Keys of the previous chunk (or of the carried window in front of chunk 0).
        pos_p = pos_c - BT
        v_p = _load_rows(v, win_v, b, hk, pos_p, T, S, 0, HKV, DV, BV, HAS_WIN)
        ok_p = _key_ok(tm, win_m, b, pos_p, T, S, HAS_MASK, HAS_WIN)
        pkp_p = _load_phi(phk, phw, b, h, pos_p, T, S, 0, H, F, BF, HAS_WIN)
        pkp_n = _load_phi(phk, phw, b, h, pos_p, T, S, F, H, F, BF, HAS_WIN)
        lin_p = (pos_p[None, :] <= rows[:, None] - W) & ok_p[None, :]
        p_p = tl.where(lin_p, _mm(phq_p, tl.trans(pkp_p), PREC) + _mm(phq_n, tl.trans(pkp_n), PREC), 0.0)
    if W > 0:
        od = tl.arange(0, BD)
        qq = tl.load(q + qrow[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
        k_c = _load_rows(k, win_k, b, hk, pos_c, T, S, 0, HKV, D, BD, HAS_WIN)
        s_c, win_c = _window_scores(qq, k_c, rows, pos_c, ok_c, scale, softcap, W, SOFTCAP, PREC)
        m = tl.max(s_c, 1)
        if LAG:
            k_p = _load_rows(k, win_k, b, hk, pos_p, T, S, 0, HKV, D, BD, HAS_WIN)
            s_p, win_p = _window_scores(qq, k_p, rows, pos_p, ok_p, scale, softcap, W, SOFTCAP, PREC)
            m = tl.maximum(m, tl.max(s_p, 1))
        m = tl.where(m == float("-inf"), 0.0, m)
        p_c += tl.where(win_c, g * tl.exp(s_c - m[:, None]), 0.0)
        if LAG:
            p_p += tl.where(win_p, g * tl.exp(s_p - m[:, None]), 0.0)
    acc += _mm(p_c.to(dt), v_c, PREC)
    den += tl.sum(p_c, 1)
    if LAG:
        acc += _mm(p_p.to(dt), v_p, PREC)
        den += tl.sum(p_p, 1)
    den += EPS
    out = acc / den[:, None]
    omask = rmask[:, None] & (ov[None, :] < DV)
    tl.store(o + qrow[:, None] * DV + ov[None, :], out.to(o.dtype.element_ty), mask=omask)
    tl.store(den_out + qrow, den, mask=rmask)


@triton.jit
def _delta_kernel(do, o, delta, N, DV: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    # delta = do . o per row of the [N, DV] tensors, in fp32.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ov = tl.arange(0, BV)
    m = (r < N)[:, None] & (ov < DV)[None, :]
    off = r.to(tl.int64)[:, None] * DV + ov[None, :]
    dd = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
    oo = tl.load(o + off, mask=m, other=0.0).to(tl.float32)
    tl.store(delta + r, tl.sum(dd * oo, 1), mask=r < N)


@triton.jit
def _bwd_state_kernel(
    phq, do, den_ptr, delta_ptr, dhkv, dhz,
    T, NT,
    H: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr, PREC: tl.constexpr,
    NITER: tl.constexpr,
):  # fmt: skip
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    half = tl.program_id(2)
    b = bh // H
    h = bh % H
    of = tl.arange(0, BF)
    ov = iv * BV + tl.arange(0, BV)
    fm = of < F
    f0 = half * F
    smask = fm[:, None] & (ov[None, :] < DV)
    acc = tl.zeros([BF, BV], dtype=tl.float32)
    dz = tl.zeros([BF], dtype=tl.float32)
    # Walk the chunks backwards; key chunk i - LAG sees the state gradients of query chunks after i.
    for j in range(NITER if NITER > 0 else NT + LAG):
        i = NT - 1 + LAG - j
        if i >= LAG:
            hst = ((bh * NT + i - LAG) * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
            tl.store(dhkv + hst, acc.to(dhkv.dtype.element_ty), mask=smask)
            if iv == 0:
                tl.store(dhz + (bh * NT + i - LAG) * 2 * F + f0 + of, dz, mask=fm)
        if i < NT:
            rows = i * BT + tl.arange(0, BT)
            rmask = rows < T
            qrow = (b * T + rows).to(tl.int64) * H + h
            ph = _load_phi(phq, phq, b, h, rows, T, 0, f0, H, F, BF, False)
            dN, dD = _out_grads(do, den_ptr, delta_ptr, qrow, rmask, iv * BV, DV, BV, ph.dtype)
            acc += _mm(tl.trans(ph), dN, PREC)
            dz += tl.sum(ph.to(tl.float32) * dD[:, None], 0)


@triton.jit
def _bwd_q_kernel(
    q, k, v, phq, phk, phw, wq, wf, tm, win_k, win_v, win_m, hkv, hz, do, den_ptr, delta_ptr,
    dq, dpq, m_ptr, arg_ptr, dm_ptr, dwf,
    T, NT, S, scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr, BQ: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Query side: dq and the gradient of the q feature-map pre-activation for query chunk c.
    # Program i covers the BQ query rows from i * BQ on, in chunk c.
    i = tl.program_id(0)
    c = i // (BT // BQ)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    rows = i * BQ + tl.arange(0, BQ)
    rmask = rows < T
    od = tl.arange(0, BD)
    ov = tl.arange(0, BV)
    of = tl.arange(0, BF)
    dmask = rmask[:, None] & (od[None, :] < D)
    qrow = (b * T + rows).to(tl.int64) * H + h
    phq_p = _load_phi(phq, phq, b, h, rows, T, S, 0, H, F, BF, False)
    phq_n = _load_phi(phq, phq, b, h, rows, T, S, F, H, F, BF, False)
    dt = phq_p.dtype
    dN, dD = _out_grads(do, den_ptr, delta_ptr, qrow, rmask, 0, DV, BV, dt)

    smask = (of[:, None] < F) & (ov[None, :] < DV)
    hst = ((bh * NT + c) * 2 * F + of[:, None]).to(tl.int64) * DV + ov[None, :]
    h_p = tl.load(hkv + hst, mask=smask, other=0.0).to(dt)
    h_n = tl.load(hkv + hst + F * DV, mask=smask, other=0.0).to(dt)
    z_p = tl.load(hz + (bh * NT + c) * 2 * F + of, mask=of < F, other=0.0)
    z_n = tl.load(hz + (bh * NT + c) * 2 * F + F + of, mask=of < F, other=0.0)
    dphq_p = _mm(dN, tl.trans(h_p), PREC) + dD[:, None] * z_p[None, :]
    dphq_n = _mm(dN, tl.trans(h_n), PREC) + dD[:, None] * z_n[None, :]

    pos_c = c * BT + tl.arange(0, BT)
    v_c = _load_rows(v, win_v, b, hk, pos_c, T, S, 0, HKV, DV, BV, HAS_WIN)
    ok_c = _key_ok(tm, win_m, b, pos_c, T, S, HAS_MASK, HAS_WIN)
    lin_c = (pos_c[None, :] <= rows[:, None] - W) & ok_c[None, :]
    dp_c = _mm(dN, tl.trans(v_c), PREC) + dD[:, None]
    dl_c = tl.where(lin_c, dp_c, 0.0).to(dt)
    dphq_p += _mm(dl_c, _load_phi(phk, phw, b, h, pos_c, T, S, 0, H, F, BF, HAS_WIN), PREC)
    dphq_n += _mm(dl_c, _load_phi(phk, phw, b, h, pos_c, T, S, F, H, F, BF, HAS_WIN), PREC)
    if LAG:
        # Keys of the previous chunk (or of the carried window in front of chunk 0).
        pos_p = pos_c - BT
        v_p = _load_rows(v, win_v, b, hk, pos_p, T, S, 0, HKV, DV, BV, HAS_WIN)
        ok_p = _key_ok(tm, win_m, b, pos_p, T, S, HAS_MASK, HAS_WIN)
        lin_p = (pos_p[None, :] <= rows[:, None] - W) & ok_p[None, :]
        dp_p = _mm(dN, tl.trans(v_p), PREC) + dD[:, None]
        dl_p = tl.where(lin_p, dp_p, 0.0).to(dt)
        dphq_p += _mm(dl_p, _load_phi(phk, phw, b, h, pos_p, T, S, 0, H, F, BF, HAS_WIN), PREC)
        dphq_n += _mm(dl_p, _load_phi(phk, phw, b, h, pos_p, T, S, F, H, F, BF, HAS_WIN), PREC)
    gq = _feature_map_bwd(phq_p.to(tl.float32), phq_n.to(tl.float32), dphq_p, dphq_n)
    tl.store(
        dpq + qrow[:, None] * F + of[None, :], gq.to(dpq.dtype.element_ty), mask=rmask[:, None] & (of[None, :] < F)
    )
    # Back through the projection: dq += g wq^T.
    dq_acc = _mm(gq.to(dt), tl.trans(_load_w(wq, h, D, F, BD, BF).to(dt)), PREC)

    if W > 0:
        qq = tl.load(q + qrow[:, None] * D + od[None, :], mask=dmask, other=0.0)
        k_c = _load_rows(k, win_k, b, hk, pos_c, T, S, 0, HKV, D, BD, HAS_WIN)
        if LAG:
            k_p = _load_rows(k, win_k, b, hk, pos_p, T, S, 0, HKV, D, BD, HAS_WIN)
        g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
        s_c, win_c = _window_scores(qq, k_c, rows, pos_c, ok_c, scale, softcap, W, SOFTCAP, PREC)
        m = tl.max(s_c, 1)
        if LAG:
            s_p, win_p = _window_scores(qq, k_p, rows, pos_p, ok_p, scale, softcap, W, SOFTCAP, PREC)
            m = tl.maximum(m, tl.max(s_p, 1))
        m = tl.where(m == float("-inf"), 0.0, m)
        # The row max m enters as exp(s - m), so its gradient goes to the arg-max key: the latest of any ties
        # (one valid subgradient). Carried window keys have negative positions, so NO_KEY marks a row without
        # window keys.
        arg = tl.max(tl.where(win_c & (s_c == m[:, None]), pos_c[None, :], NO_KEY), 1)
        if LAG:
            arg = tl.maximum(arg, tl.max(tl.where(win_p & (s_p == m[:, None]), pos_p[None, :], NO_KEY), 1))
        a_c = tl.where(win_c, g * tl.exp(s_c - m[:, None]), 0.0)
        # da/ds = a.
        daa_c = tl.where(win_c, dp_c * a_c, 0.0)
        dm = -tl.sum(daa_c, 1)
        if LAG:
            a_p = tl.where(win_p, g * tl.exp(s_p - m[:, None]), 0.0)
            daa_p = tl.where(win_p, dp_p * a_p, 0.0)
            dm -= tl.sum(daa_p, 1)
        # The key side reuses the row max, the arg-max and its gradient instead of recomputing both chunks.
        tl.store(m_ptr + qrow, m, mask=rmask)
        tl.store(arg_ptr + qrow, arg, mask=rmask)
        tl.store(dm_ptr + qrow, dm, mask=rmask)
        ds_c = daa_c + tl.where(pos_c[None, :] == arg[:, None], dm[:, None], 0.0)
        if SOFTCAP:
            # s = c tanh(r / c): ds/dr = 1 - (s / c)^2.
            sc = tl.where(win_c, s_c / softcap, 0.0)
            ds_c = ds_c * (1.0 - sc * sc)
        dqw = _mm(ds_c.to(dt), k_c, PREC)
        dg = tl.sum(tl.sum(daa_c, 1), 0)
        if LAG:
            ds_p = daa_p + tl.where(pos_p[None, :] == arg[:, None], dm[:, None], 0.0)
            if SOFTCAP:
                sp = tl.where(win_p, s_p / softcap, 0.0)
                ds_p = ds_p * (1.0 - sp * sp)
            dqw += _mm(ds_p.to(dt), k_p, PREC)
            dg += tl.sum(tl.sum(daa_p, 1), 0)
        dq_acc += dqw * scale
        # a = sigmoid(wf) e: d wf = sum dA a (1 - g).
        tl.store(dwf + bh * tl.num_programs(0) + i, dg * (1.0 - g))
    tl.store(dq + qrow[:, None] * D + od[None, :], dq_acc.to(dq.dtype.element_ty), mask=dmask)


@triton.jit
def _bwd_kv_visit(
    q, phq, do, den_ptr, delta_ptr, m_ptr, arg_ptr, dm_ptr,
    dph_p, dph_n, dk_acc, dv_acc, k_j, v_j, pk_p, pk_n, ok_j, pos, r0, b, h, g, T, scale, softcap,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BQ: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Adds what the BQ query rows from r0 on (head h) send back to key chunk `pos`: to dphi_k (both halves), dk
    # and dv. Rows past T load as zeros and send nothing.
    rows = r0 + tl.arange(0, BQ)
    rmask = rows < T
    qrow = (b * T + rows).to(tl.int64) * H + h
    phq_p = _load_phi(phq, phq, b, h, rows, T, 0, 0, H, F, BF, False)
    phq_n = _load_phi(phq, phq, b, h, rows, T, 0, F, H, F, BF, False)
    dt = phq_p.dtype
    dN, dD = _out_grads(do, den_ptr, delta_ptr, qrow, rmask, 0, DV, BV, dt)
    dp = _mm(dN, tl.trans(v_j), PREC) + dD[:, None]
    lin = (pos[None, :] <= rows[:, None] - W) & ok_j[None, :]
    p = tl.where(lin, _mm(phq_p, tl.trans(pk_p), PREC) + _mm(phq_n, tl.trans(pk_n), PREC), 0.0)
    dlt = tl.trans(tl.where(lin, dp, 0.0).to(dt))
    dph_p += _mm(dlt, phq_p, PREC)
    dph_n += _mm(dlt, phq_n, PREC)
    if W > 0:
        od = tl.arange(0, BD)
        qq = tl.load(q + qrow[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        s, win = _window_scores(qq, k_j, rows, pos, ok_j, scale, softcap, W, SOFTCAP, PREC)
        m = tl.load(m_ptr + qrow, mask=rmask, other=0.0)
        arg = tl.load(arg_ptr + qrow, mask=rmask, other=NO_KEY)
        dm = tl.load(dm_ptr + qrow, mask=rmask, other=0.0)
        a = tl.where(win, g * tl.exp(s - m[:, None]), 0.0)
        p += a
        ds = tl.where(win, dp * a, 0.0) + tl.where(pos[None, :] == arg[:, None], dm[:, None], 0.0)
        if SOFTCAP:
            sc = tl.where(win, s / softcap, 0.0)
            ds = ds * (1.0 - sc * sc)
        dk_acc += _mm(tl.trans(ds.to(dt)), qq, PREC) * scale
    dv_acc += _mm(tl.trans(p.to(dt)), dN, PREC)
    return dph_p, dph_n, dk_acc, dv_acc


@triton.jit
def _bwd_kv_kernel(
    q, k, v, phq, phk, wk, wf, tm, win_m, dhkv, dhz, do, den_ptr, delta_ptr, m_ptr, arg_ptr, dm_ptr,
    dk, dv, dpk,
    T, NT, S, scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    # Key side: dk, dv (of query head h; the GQA group sum is left to the caller) and the gradient of the k
    # feature-map pre-activation of key chunk j. Its keys are seen exactly by query chunks j and (when LAG) j + 1,
    # and through the states by all later ones, whose summed gradient is dH, dz.
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    pos = j * BT + tl.arange(0, BT)
    kmask = pos < T
    od = tl.arange(0, BD)
    ov = tl.arange(0, BV)
    of = tl.arange(0, BF)
    v_j = _load_rows(v, v, b, hk, pos, T, S, 0, HKV, DV, BV, False)
    dt = v_j.dtype
    if W > 0:
        k_j = _load_rows(k, k, b, hk, pos, T, S, 0, HKV, D, BD, False)
    else:
        k_j = v_j
    ok_j = _key_ok(tm, win_m, b, pos, T, S, HAS_MASK, False)
    smask = (of[:, None] < F) & (ov[None, :] < DV)
    dk_acc = tl.zeros([BT, BD], dtype=tl.float32)
    dv_acc = tl.zeros([BT, BV], dtype=tl.float32)
    g = 0.0
    if W > 0:
        g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
    pk_p = tl.where(ok_j[:, None], _load_phi(phk, phk, b, h, pos, T, 0, 0, H, F, BF, False), 0.0)
    pk_n = tl.where(ok_j[:, None], _load_phi(phk, phk, b, h, pos, T, 0, F, H, F, BF, False), 0.0)
    hst = ((bh * NT + j) * 2 * F + of[:, None]).to(tl.int64) * DV + ov[None, :]
    dh_p = tl.load(dhkv + hst, mask=smask, other=0.0).to(dt)
    dh_n = tl.load(dhkv + hst + F * DV, mask=smask, other=0.0).to(dt)
    dz_p = tl.load(dhz + (bh * NT + j) * 2 * F + of, mask=of < F, other=0.0)
    dz_n = tl.load(dhz + (bh * NT + j) * 2 * F + F + of, mask=of < F, other=0.0)
    # dphi_k is summed over the state and the (at most two) visits, and mapped back through the feature map once.
    dph_p = _mm(v_j, tl.trans(dh_p), PREC) + dz_p[None, :]
    dph_n = _mm(v_j, tl.trans(dh_n), PREC) + dz_n[None, :]
    dv_acc += _mm(pk_p, dh_p, PREC) + _mm(pk_n, dh_n, PREC)
    # The query chunks j and (when LAG) j + 1, in blocks of BQ rows: smaller temporaries beside the accumulators.
    for sub in range((1 + LAG) * (BT // BQ)):
        dph_p, dph_n, dk_acc, dv_acc = _bwd_kv_visit(
            q, phq, do, den_ptr, delta_ptr, m_ptr, arg_ptr, dm_ptr,
            dph_p, dph_n, dk_acc, dv_acc, k_j, v_j, pk_p, pk_n, ok_j, pos, j * BT + sub * BQ, b, h, g, T,
            scale, softcap, H, D, DV, F, W, BQ, BD, BV, BF, SOFTCAP, PREC,
        )  # fmt: skip
    gk = _feature_map_bwd(pk_p.to(tl.float32), pk_n.to(tl.float32), dph_p, dph_n)
    krow = (b * T + pos).to(tl.int64) * H + h
    tl.store(dpk + krow[:, None] * F + of[None, :], gk.to(dpk.dtype.element_ty),
             mask=kmask[:, None] & (of[None, :] < F))  # fmt: skip
    # Back through the projection: dk += g wk^T.
    dk_acc += _mm(gk.to(dt), tl.trans(_load_w(wk, h, D, F, BD, BF).to(dt)), PREC)
    tl.store(dk + krow[:, None] * D + od[None, :], dk_acc.to(dk.dtype.element_ty),
             mask=kmask[:, None] & (od[None, :] < D))  # fmt: skip
    tl.store(dv + krow[:, None] * DV + ov[None, :], dv_acc.to(dv.dtype.element_ty),
             mask=kmask[:, None] & (ov[None, :] < DV))  # fmt: skip


@triton.jit
def _wgrad_kernel(
    x, gr, part, R, ROWS_PER,
    H: tl.constexpr, HX: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    BF: tl.constexpr, PREC: tl.constexpr, NITER: tl.constexpr,
):  # fmt: skip
    # part[s, h] = sum over rows r of split s of x[r, h // G]^T g[r, h], for x [R, HX, D] and g [R, H, F] of one
    # type; fp32 partial sums.
    sp = tl.program_id(0)
    h = tl.program_id(1)
    hx = h // (H // HX)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    acc = tl.zeros([BD, BF], dtype=tl.float32)
    r0 = sp * ROWS_PER
    for i in range(NITER if NITER > 0 else tl.cdiv(ROWS_PER, BR)):
        r = r0 + i * BR + tl.arange(0, BR)
        rm = (r < R) & (r < r0 + ROWS_PER)
        xx = tl.load(x + (r.to(tl.int64) * HX + hx)[:, None] * D + od[None, :], mask=rm[:, None] & (od < D)[None, :],
                     other=0.0)  # fmt: skip
        gg = tl.load(gr + (r.to(tl.int64) * H + h)[:, None] * F + of[None, :], mask=rm[:, None] & (of < F)[None, :],
                     other=0.0)  # fmt: skip
        acc += _mm(tl.trans(xx), gg, PREC)
    out = ((sp * H + h) * D + od[:, None]).to(tl.int64) * F + of[None, :]
    tl.store(part + out, acc, mask=(od < D)[:, None] & (of < F)[None, :])


def _empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Every buffer a kernel fully overwrites comes from here; the tests swap in a NaN-filled allocation."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _Plan:
    """Sizes, flags and the (int8) masks shared by the kernels of one call."""

    def __init__(self, q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap):
        self.B, self.T, self.H, self.D = q.shape
        self.HKV, self.DV, self.F = k.shape[2], v.shape[-1], wq.shape[-1]
        self.W, self.scale, self.softcap = window, float(scale), float(softcap or 0.0)
        self.NT = triton.cdiv(self.T, BLOCK_T)
        # With W >= 2 a query needs the raw keys of the previous chunk, so the stored state lags one chunk behind.
        self.LAG = 1 if window >= 2 else 0
        self.SOUT = max(window - 1, 0)
        self.S = win_k.shape[1] if win_k is not None else 0
        self.BD, self.BV, self.BF = _pow2(self.D), _pow2(self.DV), _pow2(self.F)
        self.BV_STATE = min(self.BV, BV_STATE)
        self.PREC = "tf32x3" if q.dtype == torch.float32 else "tf32"
        # Kernels on CPU tensors run under the interpreter, where loop bounds are passed as constants (NITER):
        # the interpreter of some Triton versions (3.6) fails on a run-time bound. Compiled kernels get 0 and
        # read the bound at run time, so that one compilation serves every length.
        self.interpreted = q.device.type != "cuda"
        dummy = torch.zeros(1, dtype=torch.int8, device=q.device)
        self.tm = token_mask.to(torch.int8).contiguous() if token_mask is not None else dummy
        self.wm = win_mask.to(torch.int8).contiguous() if self.S else dummy
        # Kernels take a pointer even where a flag turns the tensor off.
        self.win_k = win_k.contiguous() if self.S else k
        self.HAS_MASK = token_mask is not None

    def niter(self, n: int) -> int:
        return n if self.interpreted else 0

    def common(self) -> dict:
        return dict(H=self.H, HKV=self.HKV, D=self.D, DV=self.DV, F=self.F, BT=BLOCK_T, BD=self.BD, BF=self.BF,
                    LAG=self.LAG, PREC=self.PREC)  # fmt: skip


def _features(p: _Plan, x, w):
    """Hedgehog features `[B, T', H, 2F]` in the type of x, for x `[B, T', HX, D]` and weights `[H, D, F]`."""
    B, T = x.shape[:2]
    phi = _empty(B, T, p.H, 2 * p.F, dtype=x.dtype, device=x.device)
    if T:
        _phi_kernel[(triton.cdiv(T, BLOCK_T), B * p.H)](
            x, w, phi, T, H=p.H, HX=x.shape[2], D=p.D, F=p.F, BT=BLOCK_T, BD=p.BD, BF=p.BF,
            num_warps=WARPS["phi"],
        )  # fmt: skip
    return phi


def _states(p: _Plan, phk, phw, v, win_v, kv0, z0, store_final: bool):
    """Per-chunk linear states `[B, H, NT, 2F, DV]` in the input type, `[B, H, NT, 2F]` in fp32 (and the final ones,
    both fp32, if asked)."""
    dev = v.device
    hkv = _empty(p.B, p.H, p.NT, 2 * p.F, p.DV, dtype=v.dtype, device=dev)
    hz = _empty(p.B, p.H, p.NT, 2 * p.F, device=dev)
    kv_out = _empty(p.B, p.H, 2 * p.F, p.DV, device=dev) if store_final else hkv
    z_out = _empty(p.B, p.H, 2 * p.F, device=dev) if store_final else hz
    grid = (triton.cdiv(p.DV, p.BV_STATE), p.B * p.H, 2)
    _fwd_state_kernel[grid](
        phk, phw, v, p.tm, win_v, p.wm, kv0 if kv0 is not None else hkv, z0 if z0 is not None else hz,
        hkv, hz, kv_out, z_out, p.T, p.NT, p.S, p.SOUT,
        H=p.H, HKV=p.HKV, DV=p.DV, F=p.F, BT=BLOCK_T, BV=p.BV_STATE, BF=p.BF, LAG=p.LAG, PREC=p.PREC,
        HAS_MASK=p.HAS_MASK, HAS_WIN=p.S > 0, HAS_INIT=kv0 is not None, STORE_FINAL=store_final,
        NITER=p.niter(p.NT + p.LAG), num_warps=WARPS["fwd_state"],
    )  # fmt: skip
    return hkv, hz, kv_out, z_out


def _weight_grad(p: _Plan, x, gr):
    """`[H, D, F]` sum over tokens of x^T g for x `[B, T, HX, D]` and g `[B, T, H, F]` (fp32), split over tokens."""
    R = p.B * p.T
    rows_per = max(BLOCK_T, triton.cdiv(triton.cdiv(R, 16), BLOCK_T) * BLOCK_T)
    splits = triton.cdiv(R, rows_per)
    part = _empty(splits, p.H, p.D, p.F, device=x.device)
    _wgrad_kernel[(splits, p.H)](
        x, gr, part, R, rows_per, H=p.H, HX=x.shape[2], D=p.D, F=p.F, BR=BLOCK_T, BD=p.BD, BF=p.BF, PREC=p.PREC,
        NITER=p.niter(triton.cdiv(rows_per, BLOCK_T)), num_warps=WARPS["wgrad"],
    )  # fmt: skip
    return part.sum(0)


class _HybridChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, window, scale, softcap,
                output_final_state):  # fmt: skip
        p = _Plan(q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap)
        win_v = win_v.contiguous() if p.S else v
        phq, phk, phw = _features(p, q, wq), _features(p, k, wk), _features(p, p.win_k, wk) if p.S else None
        phw = phw if phw is not None else phk
        hkv, hz, kv_out, z_out = _states(p, phk, phw, v, win_v, kv0, z0, output_final_state)
        o = _empty(p.B, p.T, p.H, p.DV, dtype=q.dtype, device=q.device)
        den = _empty(p.B, p.T, p.H, device=q.device)
        _fwd_out_kernel[(triton.cdiv(p.T, BQ_OUT), p.B * p.H)](
            q, k, v, phq, phk, phw, wf, p.tm, p.win_k, win_v, p.wm, hkv, hz, o, den,
            p.T, p.NT, p.S, p.scale, p.softcap,
            W=p.W, BV=p.BV, HAS_MASK=p.HAS_MASK, HAS_WIN=p.S > 0, SOFTCAP=p.softcap != 0.0, **p.common(),
            BQ=BQ_OUT, num_warps=WARPS["fwd_out"],
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, o, den)
        ctx.plan_args = (window, scale, softcap)
        if not output_final_state:
            return o, None, None
        ctx.mark_non_differentiable(kv_out, z_out)
        return o, kv_out, z_out

    @staticmethod
    def backward(ctx, do, _dkv, _dz):
        q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, o, den = ctx.saved_tensors
        window, scale, softcap = ctx.plan_args
        p = _Plan(q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap)
        win_v = win_v.contiguous() if p.S else v
        B, T, H, D, DV, F, HKV = p.B, p.T, p.H, p.D, p.DV, p.F, p.HKV
        dev = q.device
        do = do.contiguous()
        delta = _empty(B, T, H, device=dev)
        rows = B * T * H
        _delta_kernel[(triton.cdiv(rows, 32),)](do, o, delta, rows, DV=DV, BR=32, BV=p.BV, num_warps=WARPS["delta"])
        # The features and states are recomputed rather than kept from the forward: they are the largest
        # intermediates.
        phq, phk, phw = _features(p, q, wq), _features(p, k, wk), _features(p, p.win_k, wk) if p.S else None
        phw = phw if phw is not None else phk
        hkv, hz, _, _ = _states(p, phk, phw, v, win_v, kv0, z0, False)
        dhkv = _empty(*hkv.shape, dtype=hkv.dtype, device=dev)
        dhz = _empty(*hz.shape, device=dev)
        _bwd_state_kernel[(triton.cdiv(DV, p.BV_STATE), B * H, 2)](
            phq, do, den, delta, dhkv, dhz, T, p.NT,
            H=H, DV=DV, F=F, BT=BLOCK_T, BV=p.BV_STATE, BF=p.BF, LAG=p.LAG, PREC=p.PREC,
            NITER=p.niter(p.NT + p.LAG), num_warps=WARPS["bwd_state"],
        )  # fmt: skip
        flags = dict(W=p.W, BV=p.BV, HAS_MASK=p.HAS_MASK, HAS_WIN=p.S > 0, SOFTCAP=p.softcap != 0.0, **p.common())
        dq = _empty(B, T, H, D, dtype=q.dtype, device=dev)
        # The pre-activation gradients go to the weight-gradient products in the input type.
        dpq = _empty(B, T, H, F, dtype=q.dtype, device=dev)
        # Per query row: the window's max score, its arg-max key and the max's gradient (window > 0 only).
        m = _empty(B, T, H, device=dev) if window > 0 else den
        arg = _empty(B, T, H, dtype=torch.int32, device=dev) if window > 0 else den
        dm = _empty(B, T, H, device=dev) if window > 0 else den
        nq = triton.cdiv(T, BQ_Q)
        dwf = _empty(B * H * nq, device=dev) if window > 0 else den
        _bwd_q_kernel[(nq, B * H)](
            q, k, v, phq, phk, phw, wq, wf, p.tm, p.win_k, win_v, p.wm, hkv, hz, do, den, delta,
            dq, dpq, m, arg, dm, dwf, T, p.NT, p.S, p.scale, p.softcap, **flags, BQ=BQ_Q, num_warps=WARPS["bwd_q"],
        )  # fmt: skip
        # Per query head; with GQA in fp32, for the group sum below.
        groups = H // HKV
        dk = _empty(B, T, H, D, dtype=k.dtype if groups == 1 else torch.float32, device=dev)
        dv = _empty(B, T, H, DV, dtype=v.dtype if groups == 1 else torch.float32, device=dev)
        dpk = _empty(B, T, H, F, dtype=q.dtype, device=dev)
        _bwd_kv_kernel[(p.NT, B * H)](
            q, k, v, phq, phk, wk, wf, p.tm, p.wm, dhkv, dhz, do, den, delta, m, arg, dm,
            dk, dv, dpk, T, p.NT, p.S, p.scale, p.softcap, **flags, BQ=BQ_KV, num_warps=WARPS["bwd_kv"],
        )  # fmt: skip
        if groups > 1:
            dk = dk.view(B, T, HKV, groups, D).sum(3).to(k.dtype)
            dv = dv.view(B, T, HKV, groups, DV).sum(3).to(v.dtype)
        dwq = _weight_grad(p, q, dpq)
        dwk = _weight_grad(p, k, dpk)
        dwf_out = dwf.view(B, H, nq).sum((0, 2)).to(wf.dtype) if window > 0 and ctx.needs_input_grad[5] else None
        return (
            dq, dk, dv, dwq.to(wq.dtype), dwk.to(wk.dtype), dwf_out,
            None, None, None, None, None, None, None, None, None, None,
        )  # fmt: skip


def hybrid_attention_triton(
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
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """Hybrid attention over a block of new tokens with the chunked Triton kernels (differentiable).

    Args:
        q: `[B, T, H, D]` queries after RoPE; bf16, fp16 or fp32.
        k: `[B, T, Hkv, D]` keys after RoPE; `H` a multiple of `Hkv`.
        v: `[B, T, Hkv, Dv]`.
        wq, wk: `[H, D, F]` feature-map weights (any float dtype; used in fp32).
        window_factor: `[H]` logits of the window-term weight; ignored when `window == 0`.
        window: exact-softmax window, 0 or 1..64 (the chunk length `BLOCK_T`).
        scale: softmax scale of the window scores.
        softcap: optional logit soft-cap of the window scores.
        token_mask: `[B, T]` bool, False for padding.
        initial_state: state after the previous tokens; None starts from empty. Receives no gradient.
        output_final_state: return the state after these tokens (not differentiable).
        chunk_size: accepted for signature parity with the PyTorch path; the kernels use `BLOCK_T`.

    Returns:
        `([B, T, H, Dv]` output in the dtype of `q`, final `HybridState` or None).

    D, Dv and F up to 128; gradients flow to q, k, v, wq, wk and window_factor.
    """
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[-1], wq.shape[-1]
    if window < 0 or window > BLOCK_T:
        raise ValueError(
            f"the Triton hybrid kernel supports window 0 or 1..{BLOCK_T} (its chunk length), got {window}; "
            "use LINEARIZE_KERNELS=torch for longer windows"
        )
    if max(D, Dv, F) > MAX_DIM:
        raise ValueError(f"the Triton hybrid kernel supports D, Dv, F up to {MAX_DIM}, got {D}, {Dv}, {F}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    slots = max(window - 1, 0)
    if initial_state is not None and initial_state.win_k.shape[1] != slots:
        raise ValueError(f"initial_state holds {initial_state.win_k.shape[1]} window slots, expected {slots}")
    if T == 0:
        from .torch_chunked import hybrid_attention_chunked

        return hybrid_attention_chunked(q, k, v, wq, wk, window_factor, window, scale, softcap, token_mask,
                                        initial_state, output_final_state)  # fmt: skip
    k, v = k.to(q.dtype), v.to(q.dtype)
    wf = window_factor if window > 0 else torch.zeros(H, dtype=torch.float32, device=q.device)
    st = initial_state
    has_win = st is not None and slots > 0
    o, kv, ksum = _HybridChunk.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), wq.contiguous(), wk.contiguous(), wf.contiguous(),
        token_mask, st.kv.contiguous() if st is not None else None, st.ksum.contiguous() if st is not None else None,
        st.win_k.to(q.dtype) if has_win else None, st.win_v.to(q.dtype) if has_win else None,
        st.win_mask if has_win else None, window, scale, softcap, output_final_state,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    return o, HybridState(kv, ksum, *_final_window(k, v, token_mask, st, slots))


def _final_window(k, v, token_mask, state, slots):
    """The last `slots` raw keys, values and mask after these tokens, oldest first (as `HybridState` holds them)."""
    B, T = k.shape[:2]
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=k.device)
    if T >= slots:
        return k[:, T - slots :].clone(), v[:, T - slots :].clone(), token_mask[:, T - slots :].clone()
    if state is None:
        win_k = k.new_zeros(B, slots, *k.shape[2:])
        win_v = v.new_zeros(B, slots, *v.shape[2:])
        win_mask = torch.zeros(B, slots, dtype=torch.bool, device=k.device)
    else:
        win_k, win_v, win_mask = state.win_k, state.win_v, state.win_mask
    return (
        torch.cat([win_k[:, T:].to(k.dtype), k], 1),
        torch.cat([win_v[:, T:].to(v.dtype), v], 1),
        torch.cat([win_mask[:, T:], token_mask], 1),
    )
