"""Backward kernels of the chunked hybrid op: delta, the reverse state-gradient pass, the query-side and key-side
gradients and the feature-map weight gradients.

`triton_chunk.py` says how they fit together and launches them.
"""

import triton
import triton.language as tl

from .triton_common import (
    NO_KEY,
    _continues,
    _feature_map_bwd,
    _heads,
    _inv_den,
    _key_ok,
    _load_block,
    _load_chunk_state,
    _load_do_scaled,
    _load_out_grads,
    _load_phi,
    _load_phi_pair,
    _load_rows,
    _load_w_as,
    _mm,
    _query_block,
    _row_chunks,
    _soft_cap_grad,
    _store_block,
    _store_sums,
    _weighted_col_sums,
    _window_scores,
)


@triton.jit
def _delta_kernel(do, o, den, dn, dd_out, N, DV: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    # For y = N / den per row of the [N, DV] tensors: dN = do / den in the type of do and d(den) = -do . y / den
    # in fp32 (see `_inv_den` for rows without keys).
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ov = tl.arange(0, BV)
    m = (r < N)[:, None] & (ov < DV)[None, :]
    off = r.to(tl.int64)[:, None] * DV + ov[None, :]
    dd = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
    oo = tl.load(o + off, mask=m, other=0.0).to(tl.float32)
    rden = _inv_den(tl.load(den + r, mask=r < N, other=1.0))
    tl.store(dn + off, (dd * rden[:, None]).to(dn.dtype.element_ty), mask=m)
    tl.store(dd_out + r, -tl.sum(dd * oo, 1) * rden, mask=r < N)


@triton.jit
def _bwd_state_kernel(
    phq, dn, dd_ptr, dhkv, dhz, offs,
    T, NT,
    H: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    PREC: tl.constexpr, NITER: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    # Programs split the state and the rows (or with VARLEN the packed sequences) as in `_fwd_state_kernel`.
    iv = tl.program_id(0)
    rh = tl.program_id(1)
    f0 = tl.program_id(2) * F
    r, h, _ = _heads(rh, H, H)
    c0, nt, _, end, b = _row_chunks(offs, r, T, NT, BT, VARLEN)
    sb = b * H + h
    of = tl.arange(0, BF)
    ov = iv * BV + tl.arange(0, BV)
    fm = of < F
    smask = fm[:, None] & (ov[None, :] < DV)
    acc = tl.zeros([BF, BV], dtype=tl.float32)
    # The gradient of the key sums as a [BF, 16] tile of equal columns (`_weighted_col_sums`).
    dz = tl.zeros([BF, 16], dtype=tl.float32)
    # Walk the chunks backwards; key chunk i - LAG sees the state gradients of query chunks after i.
    for j in range(NITER if NITER > 0 else nt + LAG):
        go = True
        if NITER > 0:
            go = j < nt + LAG
        if go:
            c = c0 + nt - 1 + LAG - j
            if c >= c0 + LAG:
                hst = ((sb * NT + c - LAG) * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
                tl.store(dhkv + hst, acc.to(dhkv.dtype.element_ty), mask=smask)
                if iv == 0:
                    _store_sums(dhz + (sb * NT + c - LAG) * 2 * F + f0 + of, dz, fm)
            # Unconditional (rows past the end load as zeros when c is the chunk after the last), so that the loads
            # are pipelined across steps.
            rows = c * BT + tl.arange(0, BT)
            rmask = rows < end
            qrow = (b * T + rows).to(tl.int64) * H + h
            if VARLEN:
                rows = tl.where(rmask, rows, T)
            ph = _load_phi(phq, phq, b, h, rows, T, 0, f0, H, F, BF, False)
            dN, dD = _load_out_grads(dn, dd_ptr, qrow, rmask, iv * BV, DV, BV)
            acc += _mm(tl.trans(ph), dN, PREC)
            dz += _weighted_col_sums(ph, dD, BT, PREC)


@triton.jit
def _bwd_q_window_kernel(
    q, k, v, wf, tm, win_k, win_v, win_m, dn, dd_ptr,
    dq, dk, dv, dk_next, xc, xp, dwf, seg,
    T, NT, S, scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    QKV: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    # The window pairs (W > 0) of query chunk c, from both sides: the window's part of dq, stored in dq for
    # `_bwd_q_linear_kernel` to add; what they send to the keys of chunk c (dk, and dv when W >= BT) and of chunk
    # c - 1 (dk_next), per query head in the input type, for `_bwd_kv_linear_kernel` to add; and the window factor's
    # partial gradient. Their dN v^T + d(den) is also the score gradient of the linear pairs with the same key
    # chunks, so for each key chunk the program stores one [rows, keys] tile in the input type (xc for chunk c when
    # W < BT, xp for chunk c - 1): the window weights a on the window's pairs, the linear pairs' score gradients dl
    # and zeros elsewhere. The linear kernels read them instead of computing dN v^T again: the query side for dl,
    # the key side also for the window's dv, which it takes with the linear pairs' (`_bwd_kv_pairs_visit`). It
    # reads neither features nor states. With TMA, q, k, v, dn and the outputs but dwf are tensor descriptors
    # (`_load_block`, `_store_block`). Without QKV (no gradient asked of q, k or v, as in attention transfer) it
    # stores the tiles and the window factor's gradient only: neither dq, dk nor dv, nor the products they take.
    i, c, bh, b, h, hk, rows, rmask, qrow = _query_block(T, H, HKV, BT, BT)
    t0 = c * BT
    dN = _load_block(dn, dn, b, h, t0, T, 0, H, DV, BT, BV, False, TMA)
    dD = tl.load(dd_ptr + qrow, mask=rmask, other=0.0)
    qq = _load_block(q, q, b, h, t0, T, 0, H, D, BT, BD, False, TMA)
    dt = qq.dtype
    g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
    pos_c = rows
    ok_c = _key_ok(tm, win_m, b, pos_c, T, S, HAS_MASK, HAS_WIN)
    k_c = _load_block(k, win_k, b, hk, t0, T, S, HKV, D, BT, BD, HAS_WIN, TMA)
    s_c, win_c = _window_scores(qq, k_c, rows, pos_c, ok_c, scale, softcap, W, SOFTCAP, PREC, False)
    m = tl.max(s_c, 1)
    if LAG:
        pos_p = pos_c - BT
        ok_p = _key_ok(tm, win_m, b, pos_p, T, S, HAS_MASK, HAS_WIN)
        if VARLEN:
            # Where chunk c starts a sequence of a packed row, its pairs with chunk c - 1 are all out: the tile and
            # dk_next it stores for chunk c - 1 are zeros.
            ok_p = ok_p & _continues(seg, c, NT)
        k_p = _load_block(k, win_k, b, hk, t0 - BT, T, S, HKV, D, BT, BD, HAS_WIN, TMA)
        s_p, win_p = _window_scores(qq, k_p, rows, pos_p, ok_p, scale, softcap, W, SOFTCAP, PREC, False)
        m = tl.maximum(m, tl.max(s_p, 1))
    m = tl.where(m == float("-inf"), 0.0, m)
    if QKV:
        # The row max m enters as exp(s - m), so its gradient goes to the arg-max key: the latest of any ties (one
        # valid subgradient). Carried window keys have negative positions, so NO_KEY marks a row without window keys.
        arg = tl.max(tl.where(win_c & (s_c == m[:, None]), pos_c[None, :], NO_KEY), 1)
        if LAG:
            arg = tl.maximum(arg, tl.max(tl.where(win_p & (s_p == m[:, None]), pos_p[None, :], NO_KEY), 1))
    # Key chunk c is the program's own rows; key chunk c - 1 the chunk before (but not the carried window's keys in
    # front of chunk 0: they take no gradient). Every output is in the input type.
    v_c = _load_block(v, win_v, b, hk, t0, T, S, HKV, DV, BT, BV, HAS_WIN, TMA)
    a_c = tl.where(win_c, g * tl.exp(s_c - m[:, None]), 0.0)
    dp_c = _mm(dN, tl.trans(v_c), PREC) + dD[:, None]
    # da/ds = a.
    daa_c = tl.where(win_c, dp_c * a_c, 0.0)
    if W < BT:
        lin_c = (pos_c[None, :] <= rows[:, None] - W) & ok_c[None, :]
        _store_block(xc, tl.where(win_c, a_c, tl.where(lin_c, dp_c, 0.0)).to(dt), b, h, t0, T, H, BT, BT, BT, TMA)
    elif QKV:
        # dv = (a / den)^T do = a^T dN (a <= 1: no overflow in fp16), stored as soon as a is known, which frees it.
        _store_block(dv, _mm(tl.trans(a_c.to(dt)), dN, PREC).to(dt), b, h, t0, T, H, DV, BT, BV, TMA)
    dm = -tl.sum(daa_c, 1)
    if LAG:
        v_p = _load_block(v, win_v, b, hk, t0 - BT, T, S, HKV, DV, BT, BV, HAS_WIN, TMA)
        a_p = tl.where(win_p, g * tl.exp(s_p - m[:, None]), 0.0)
        dp_p = _mm(dN, tl.trans(v_p), PREC) + dD[:, None]
        daa_p = tl.where(win_p, dp_p * a_p, 0.0)
        lin_p = (pos_p[None, :] <= rows[:, None] - W) & ok_p[None, :]
        _store_block(xp, tl.where(win_p, a_p, tl.where(lin_p, dp_p, 0.0)).to(dt), b, h, t0, T, H, BT, BT, BT, TMA)
        dm -= tl.sum(daa_p, 1)
    # a = sigmoid(wf) e: d wf = sum dA a (1 - g), where the sum of dA a over the program's pairs is -sum(dm).
    tl.store(dwf + bh * tl.num_programs(0) + i, -tl.sum(dm, 0) * (1.0 - g))
    if QKV:
        ds_c = daa_c + tl.where(pos_c[None, :] == arg[:, None], dm[:, None], 0.0)
        if SOFTCAP:
            ds_c = _soft_cap_grad(ds_c, s_c, win_c, softcap)
        ds_c = ds_c.to(dt)
        dqw = _mm(ds_c, k_c, PREC)
        # dk = ds^T q.
        _store_block(dk, (_mm(tl.trans(ds_c), qq, PREC) * scale).to(dt), b, h, t0, T, H, D, BT, BD, TMA)
        if LAG:
            ds_p = daa_p + tl.where(pos_p[None, :] == arg[:, None], dm[:, None], 0.0)
            if SOFTCAP:
                ds_p = _soft_cap_grad(ds_p, s_p, win_p, softcap)
            ds_p = ds_p.to(dt)
            dqw += _mm(ds_p, k_p, PREC)
            if c > 0:
                _store_block(dk_next, (_mm(tl.trans(ds_p), qq, PREC) * scale).to(dt), b, h, t0 - BT, T, H, D, BT, BD,
                             TMA, True)  # fmt: skip
        _store_block(dq, (dqw * scale).to(dt), b, h, t0, T, H, D, BT, BD, TMA)


@triton.jit
def _bwd_q_linear_kernel(
    v, phq, phk, phw, wq, tm, win_v, win_m, hkv, hz, dn, dd_ptr, xc, xp,
    dq, dpq, seg,
    T, NT, S,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr, BQ: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, PREC: tl.constexpr, QKV: tl.constexpr, WGRAD: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    # Query side, linear pairs and the states: the gradient of the q feature-map pre-activation for query chunk c
    # and dq back through wq, plus (W > 0) the window's part that `_bwd_q_window_kernel` stored in dq. With a window
    # the linear pairs' score gradients come from that kernel's tiles (xc, xp); without one they are computed here.
    # It stores the pre-activation gradient only with WGRAD (a gradient asked of wq or wk) and dq only with QKV.
    i, c, bh, b, h, hk, rows, rmask, qrow = _query_block(T, H, HKV, BT, BQ)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    dmask = rmask[:, None] & (od[None, :] < D)
    phq_p, phq_n = _load_phi_pair(phq, phq, b, h, rows, T, 0, H, F, BF, False)
    dt = phq_p.dtype
    dN, dD = _load_out_grads(dn, dd_ptr, qrow, rmask, 0, DV, BV)
    h_p, h_n, z_p, z_n = _load_chunk_state(hkv, hz, bh, c, NT, DV, F, BF, BV, dt)
    dphq_p = _mm(dN, tl.trans(h_p), PREC) + dD[:, None] * z_p[None, :]
    dphq_n = _mm(dN, tl.trans(h_n), PREC) + dD[:, None] * z_n[None, :]
    pos_c = c * BT + tl.arange(0, BT)
    if W < BT:
        # (A window as long as the chunk leaves no linear term within it.)
        ok_c = _key_ok(tm, win_m, b, pos_c, T, S, HAS_MASK, HAS_WIN)
        lin_c = (pos_c[None, :] <= rows[:, None] - W) & ok_c[None, :]
        if W > 0:
            x_c = _load_rows(xc, xc, b, h, rows, T, 0, 0, H, BT, BT, False)
            dl_c = tl.where(lin_c, x_c, 0.0).to(dt)
        else:
            v_c = _load_rows(v, win_v, b, hk, pos_c, T, S, 0, HKV, DV, BV, HAS_WIN)
            dl_c = tl.where(lin_c, _mm(dN, tl.trans(v_c), PREC) + dD[:, None], 0.0).to(dt)
        pk_p, pk_n = _load_phi_pair(phk, phw, b, h, pos_c, T, S, H, F, BF, HAS_WIN)
        dphq_p += _mm(dl_c, pk_p, PREC)
        dphq_n += _mm(dl_c, pk_n, PREC)
    if LAG:
        # Keys of the previous chunk (or of the carried window in front of chunk 0): the score gradients of the
        # linear pairs from the window kernel's tile.
        pos_p = pos_c - BT
        ok_p = _key_ok(tm, win_m, b, pos_p, T, S, HAS_MASK, HAS_WIN)
        if VARLEN:
            ok_p = ok_p & _continues(seg, c, NT)
        lin_p = (pos_p[None, :] <= rows[:, None] - W) & ok_p[None, :]
        dl_p = tl.where(lin_p, _load_rows(xp, xp, b, h, rows, T, 0, 0, H, BT, BT, False), 0.0).to(dt)
        pkp_p, pkp_n = _load_phi_pair(phk, phw, b, h, pos_p, T, S, H, F, BF, HAS_WIN)
        dphq_p += _mm(dl_p, pkp_p, PREC)
        dphq_n += _mm(dl_p, pkp_n, PREC)
    gq = _feature_map_bwd(phq_p.to(tl.float32), phq_n.to(tl.float32), dphq_p, dphq_n)
    if WGRAD:
        tl.store(dpq + qrow[:, None] * F + of[None, :], gq.to(dpq.dtype.element_ty),
                 mask=rmask[:, None] & (of[None, :] < F))  # fmt: skip
    if QKV:
        # Back through the projection: dq = g wq^T (plus the window's part).
        dq_acc = _mm(gq.to(dt), tl.trans(_load_w_as(wq, h, dt, D, F, BD, BF)), PREC)
        qd = qrow[:, None] * D + od[None, :]
        if W > 0:
            dq_acc += tl.load(dq + qd, mask=dmask, other=0.0).to(tl.float32)
        tl.store(dq + qd, dq_acc.to(dq.dtype.element_ty), mask=dmask)


@triton.jit
def _bwd_kv_linear_visit(
    phq, do, den_ptr, dd_ptr, dph_p, dph_n, dv_acc, v_j, pk_p, pk_n, ok_j, pos, r0, b, h, T,
    H: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BV: tl.constexpr,
    BF: tl.constexpr, PREC: tl.constexpr, QKV: tl.constexpr,
):  # fmt: skip
    # Adds what the linear pairs of the BQ query rows from r0 on (head h) send back to key chunk `pos`: to dphi_k
    # (both halves) and, with QKV, dv. Every tile is key-major ([keys, rows]: scores and their gradients transposed), so that
    # each product has the chunk's keys as its rows and only loaded tiles are transposed, never computed ones.
    rows = r0 + tl.arange(0, BQ)
    qrow = (b * T + rows).to(tl.int64) * H + h
    # dp = v_j (do / den)^T + d(den), key-major, with the 1 / den applied to the products' columns instead of
    # loading the stored dN (fewer registers). Rows past T load as zeros and send nothing.
    dd, rden, dD = _load_do_scaled(do, den_ptr, dd_ptr, qrow, rows < T, DV, BV)
    dpt = _mm(v_j, tl.trans(dd), PREC) * rden[None, :] + dD[None, :]
    dt = v_j.dtype
    phq_p, phq_n = _load_phi_pair(phq, phq, b, h, rows, T, 0, H, F, BF, False)
    lin = (pos[:, None] <= rows[None, :] - W) & ok_j[:, None]
    dlt = tl.where(lin, dpt, 0.0).to(dt)
    dph_p += _mm(dlt, phq_p, PREC)
    dph_n += _mm(dlt, phq_n, PREC)
    if QKV:
        pt = tl.where(lin, _mm(pk_p, tl.trans(phq_p), PREC) + _mm(pk_n, tl.trans(phq_n), PREC), 0.0)
        # p / den <= 1: no overflow in fp16.
        dv_acc += _mm((pt * rden[None, :]).to(dt), dd, PREC)
    return dph_p, dph_n, dv_acc


@triton.jit
def _bwd_kv_pairs_visit(
    phq, dn, x, dph_p, dph_n, dv_acc, pk_p, pk_n, ok_j, pos, r0, b, h, T, TQ,
    H: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
    BV: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr, QKV: tl.constexpr,
):  # fmt: skip
    # With a window: adds what all pairs (window and linear) of the BQ query rows from r0 on (head h) send back to
    # key chunk `pos`, from `_bwd_q_window_kernel`'s [rows, keys] tile x of those rows (window weights a, linear
    # score gradients dl, zeros elsewhere): dv += (a + l)^T dN with l = phi_q . phi_k on the linear pairs, and
    # dphi_k += dl^T phi_q (dv only with QKV). Key-major, as `_bwd_kv_linear_visit`. Query rows from TQ on (T, or
    # in a packed row the start of the next sequence) send nothing.
    rows = r0 + tl.arange(0, BQ)
    qrow = (b * T + rows).to(tl.int64) * H + h
    rmask = rows < TQ
    keys = tl.arange(0, BT)
    xt = tl.trans(tl.load(x + qrow[:, None] * BT + keys[None, :], mask=rmask[:, None], other=0.0))
    dt = xt.dtype
    phq_p, phq_n = _load_phi_pair(phq, phq, b, h, rows, T, 0, H, F, BF, False)
    lin = (pos[:, None] <= rows[None, :] - W) & ok_j[:, None]
    if QKV:
        dN, _ = _load_out_grads(dn, dn, qrow, rmask, 0, DV, BV)
        pt = _mm(pk_p, tl.trans(phq_p), PREC) + _mm(pk_n, tl.trans(phq_n), PREC)
        # a <= 1 and l <= 2 (each feature half sums to one): no overflow in fp16.
        dv_acc += _mm(tl.where(lin, pt, xt.to(tl.float32)).to(dt), dN, PREC)
    dlt = tl.where(lin, xt, 0.0).to(dt)
    dph_p += _mm(dlt, phq_p, PREC)
    dph_n += _mm(dlt, phq_n, PREC)
    return dph_p, dph_n, dv_acc


@triton.jit
def _bwd_kv_linear_kernel(
    phq, phk, v, wk, tm, win_m, dhkv, dhz, do, den_ptr, dd_ptr, dn, xc, xp, dk, dv, dk_next, dpk, seg,
    T, NT, S,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr, BQ: tl.constexpr, QKV: tl.constexpr, WGRAD: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    # Key side: dk, dv (of query head h; the GQA group sum is left to the caller) and the gradient of the k
    # feature-map pre-activation of key chunk j. Its keys are seen on the linear side by query chunks j (when
    # W < BT) and j + 1 (when LAG), and through the states by all later ones, whose summed gradient is dH, dz. With
    # a window, the visits take the pairs with query chunks j and j + 1 from the window kernel's tiles (xc, xp),
    # window and linear alike, for dv and dphi_k; the window's dk (in dk and dk_next) and, when W >= BT, its dv
    # for chunk j (in dv) are added here. As the query side, it stores the pre-activation gradient only with WGRAD
    # and dk, dv only with QKV.
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = _heads(bh, H, HKV)
    pos = j * BT + tl.arange(0, BT)
    kmask = pos < T
    krow = (b * T + pos).to(tl.int64) * H + h
    v_j = _load_rows(v, v, b, hk, pos, T, S, 0, HKV, DV, BV, False)
    od = tl.arange(0, BD)
    ov = tl.arange(0, BV)
    of = tl.arange(0, BF)
    dt = v_j.dtype
    ok_j = _key_ok(tm, win_m, b, pos, T, S, HAS_MASK, False)
    pk_p, pk_n = _load_phi_pair(phk, phk, b, h, pos, T, 0, H, F, BF, False)
    pk_p = tl.where(ok_j[:, None], pk_p, 0.0)
    pk_n = tl.where(ok_j[:, None], pk_n, 0.0)
    dh_p, dh_n, dz_p, dz_n = _load_chunk_state(dhkv, dhz, bh, j, NT, DV, F, BF, BV, dt)
    # dphi_k is summed over the state and the (at most two) visits, and mapped back through the feature map once.
    dph_p = _mm(v_j, tl.trans(dh_p), PREC) + dz_p[None, :]
    dph_n = _mm(v_j, tl.trans(dh_n), PREC) + dz_n[None, :]
    if QKV:
        dv_acc = _mm(pk_p, dh_p, PREC) + _mm(pk_n, dh_n, PREC)
    else:
        dv_acc = tl.zeros([BT, BV], dtype=tl.float32)
    if W == 0:
        for sub in range(BT // BQ):
            dph_p, dph_n, dv_acc = _bwd_kv_linear_visit(
                phq, do, den_ptr, dd_ptr, dph_p, dph_n, dv_acc, v_j, pk_p, pk_n, ok_j, pos, j * BT + sub * BQ,
                b, h, T, H, DV, F, W, BQ, BV, BF, PREC, QKV,
            )  # fmt: skip
    else:
        # The rows of query chunk j (when W < BT: a window as long as the chunk leaves no linear pair within it)
        # and of query chunk j + 1 (when LAG), in one loop over row blocks, each reading its chunk's tile.
        first = 0 if W < BT else BT // BQ
        rows_end = T
        if VARLEN:
            # In a packed row (B == 1), query chunk j + 1 may start the next sequence, and then sees none of these
            # keys: its rows count as past the end.
            rows_end = tl.where(_continues(seg, j + 1, NT), T, (j + 1) * BT)
        for sub in range(first, (1 + LAG) * (BT // BQ)):
            if W < BT:
                x = tl.where(sub < BT // BQ, xc, xp)
            else:
                x = xp
            dph_p, dph_n, dv_acc = _bwd_kv_pairs_visit(
                phq, dn, x, dph_p, dph_n, dv_acc, pk_p, pk_n, ok_j, pos, j * BT + sub * BQ, b, h, T, rows_end,
                H, DV, F, W, BT, BQ, BV, BF, PREC, QKV,
            )  # fmt: skip
    gk = _feature_map_bwd(pk_p.to(tl.float32), pk_n.to(tl.float32), dph_p, dph_n)
    if WGRAD:
        tl.store(dpk + krow[:, None] * F + of[None, :], gk.to(dpk.dtype.element_ty),
                 mask=kmask[:, None] & (of[None, :] < F))  # fmt: skip
    if QKV:
        # Back through the projection: dk = g wk^T (plus the window's parts).
        dk_acc = _mm(gk.to(dt), tl.trans(_load_w_as(wk, h, dt, D, F, BD, BF)), PREC)
        kd = krow[:, None] * D + od[None, :]
        kv = krow[:, None] * DV + ov[None, :]
        dmask = kmask[:, None] & (od[None, :] < D)
        vmask = kmask[:, None] & (ov[None, :] < DV)
        if W > 0:
            dk_acc += tl.load(dk + kd, mask=dmask, other=0.0).to(tl.float32)
            if W >= BT:
                dv_acc += tl.load(dv + kv, mask=vmask, other=0.0).to(tl.float32)
            if LAG:
                # What query chunk j + 1 sent through the window (none past the last chunk).
                nmask = ((j + 1) * BT + 0 * pos < T)[:, None]
                dk_acc += tl.load(dk_next + kd, mask=dmask & nmask, other=0.0).to(tl.float32)
        tl.store(dk + kd, dk_acc.to(dk.dtype.element_ty), mask=dmask)
        tl.store(dv + kv, dv_acc.to(dv.dtype.element_ty), mask=vmask)


@triton.jit
def _wgrad_kernel(
    x, gr, part, x2, gr2, R, ROWS_PER, HX, HX2,
    H: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    BF: tl.constexpr, PREC: tl.constexpr, NITER: tl.constexpr,
):  # fmt: skip
    # part[0, s, h] = sum over rows r of split s of x[r, h // G]^T g[r, h], for x [R, HX, D] and g [R, H, F] of one
    # type, in fp32; programs (s, h, 1) write part[1] from x2 [R, HX2, D] and gr2 (one launch for the queries' and
    # the keys' weights, the tensors picked by pointer as in `_phi_kernel`).
    sp = tl.program_id(0)
    h = tl.program_id(1)
    second = tl.program_id(2) == 1
    x = tl.where(second, x2, x)
    gr = tl.where(second, gr2, gr)
    HX = tl.where(second, HX2, HX)
    part += tl.program_id(2).to(tl.int64) * tl.num_programs(0) * H * D * F
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
