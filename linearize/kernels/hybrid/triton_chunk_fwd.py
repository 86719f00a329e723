"""Forward kernels of the chunked hybrid op: the Hedgehog features, the sequential state pass and the output.

`triton_chunk.py` says how they fit together and launches them.
"""

import triton
import triton.language as tl

from .triton_common import (
    EPS,
    _col_sums,
    _continues,
    _heads,
    _key_ok,
    _load_chunk_state,
    _load_phi,
    _load_phi_pair,
    _load_rows,
    _load_w_as,
    _mm,
    _proj_w,
    _query_block,
    _row_chunks,
    _softmax_half,
    _store_sums,
    _window_scores,
)


@triton.jit
def _phi_kernel(x, w, phi, x2, w2, phi2, T, H: tl.constexpr, HX, HX2, D: tl.constexpr, F: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    # phi[b, t, h] = [softmax(x W_h), softmax(-x W_h)] for x [B, T, HX, D] (head h reads x head h // (H / HX)),
    # in the type of x, for STEPS chunks of one head (the weights loaded once); programs (c, bh, 1) do the same for
    # x2 [B, T, HX2, D], w2 and phi2 (one launch for the queries' and the keys' features). The pointers are chosen,
    # not the code: one code path keeps the shared memory of one.
    c = tl.program_id(0)
    bh = tl.program_id(1)
    second = tl.program_id(2) == 1
    x = tl.where(second, x2, x)
    w = tl.where(second, w2, w)
    phi = tl.where(second, phi2, phi)
    HX = tl.where(second, HX2, HX)
    b, h, _ = _heads(bh, H, H)
    hx = h // (H // HX)
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    wt = _load_w_as(w, h, x.dtype.element_ty, D, F, BD, BF)
    for s in range(STEPS):
        pos = (c * STEPS + s) * BT + tl.arange(0, BT)
        rmask = pos < T
        xrow = (b * T + pos).to(tl.int64) * HX + hx
        xx = tl.load(x + xrow[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        proj = _proj_w(xx, wt)
        prow = (b * T + pos).to(tl.int64) * H + h
        fmask = rmask[:, None] & (of[None, :] < F)
        ph_p = _softmax_half(proj, 1.0, F, BF)
        tl.store(phi + prow[:, None] * 2 * F + of[None, :], ph_p.to(phi.dtype.element_ty), mask=fmask)
        ph_n = _softmax_half(proj, -1.0, F, BF)
        tl.store(phi + prow[:, None] * 2 * F + F + of[None, :], ph_n.to(phi.dtype.element_ty), mask=fmask)


@triton.jit
def _chunk_kv(phk, phw, v, tm, win_v, win_m, b, h, hk, j, start, end, T, S, f0, c0,
              H: tl.constexpr, HKV: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
              BV: tl.constexpr, BF: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr,
              PREC: tl.constexpr, VARLEN: tl.constexpr):  # fmt: skip
    # What key chunk j adds to the state (columns c0.. of Dv, features f0..f0 + F), its keys before position `end`
    # (and with VARLEN from `start` on) only: the key sums as a [BF, 16] tile of equal columns (`_col_sums`) and
    # phi_k^T v.
    pos = j * BT + tl.arange(0, BT)
    ok = _key_ok(tm, win_m, b, pos, T, S, HAS_MASK, HAS_WIN) & (pos < end)
    if VARLEN:
        ok = ok & (pos >= start)
    vv = _load_rows(v, win_v, b, hk, pos, T, S, c0, HKV, DV, BV, HAS_WIN)
    # Rows to leave out load as zeros (position T is past the sequence), rather than being zeroed after the load.
    phi = _load_phi(phk, phw, b, h, tl.where(ok, pos, T), T, S, f0, H, F, BF, HAS_WIN)
    return _col_sums(phi, BT, PREC), _mm(tl.trans(phi), vv, PREC)


@triton.jit
def _fwd_state_kernel(
    phk, phw, v, tm, win_v, win_m, kv0, z0, hkv, hz, kv_out, z_out, offs,
    T, NT, S, SOUT,
    H: tl.constexpr, HKV: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    PREC: tl.constexpr, NITER: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    # Program (iv, rh, j) carries the Dv columns of block iv of feature half j (softmax(x W) or softmax(-x W)) of
    # head h of row r (rh = r * H + h): a batch row, or with VARLEN one of the sequences packed in the row (B == 1),
    # each over its own chunks offs[r]..offs[r + 1] (so the sequences' passes run side by side). Its initial and
    # final states are row r of kv0, z0 and kv_out, z_out.
    iv = tl.program_id(0)
    rh = tl.program_id(1)
    f0 = tl.program_id(2) * F
    r, h, hk = _heads(rh, H, HKV)
    c0, nt, start, end, b = _row_chunks(offs, r, T, NT, BT, VARLEN)
    sb = b * H + h
    of = tl.arange(0, BF)
    ov = iv * BV + tl.arange(0, BV)
    fm = of < F
    smask = fm[:, None] & (ov[None, :] < DV)
    st = ((r * H + h) * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
    sz = (r * H + h) * 2 * F + f0 + of
    if HAS_INIT:
        kv = tl.load(kv0 + st, mask=smask, other=0.0)
        z = tl.load(z0 + sz, mask=fm, other=0.0)
    else:
        kv = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
    # The key sums as a [BF, 16] tile of equal columns, accumulated as products on the tensor cores (`_col_sums`):
    # a sum over rows would reduce across warps, with barriers, at every step.
    z = tl.broadcast_to(z[:, None], [BF, 16])
    # The interpreter of some Triton versions (3.6) cannot take a run-time loop bound: there NITER holds the
    # longest row's, and each program runs its own steps.
    for i in range(NITER if NITER > 0 else nt + LAG):
        go = True
        if NITER > 0:
            go = i < nt + LAG
        if go:
            c = c0 + i
            if i < nt:
                hst = ((sb * NT + c) * 2 * F + f0 + of[:, None]).to(tl.int64) * DV + ov[None, :]
                tl.store(hkv + hst, kv.to(hkv.dtype.element_ty), mask=smask)
                if iv == 0:
                    _store_sums(hz + (sb * NT + c) * 2 * F + f0 + of, z, fm)
            # Chunk c - LAG enters the state. Only keys older than the final window count towards the final state;
            # that bound never cuts into a chunk whose state was stored above.
            dz, dkv = _chunk_kv(phk, phw, v, tm, win_v, win_m, b, h, hk, c - LAG, start, end - SOUT, T, S, f0,
                                iv * BV, H, HKV, DV, F, BT, BV, BF, HAS_MASK, HAS_WIN, PREC, VARLEN)  # fmt: skip
            z += dz
            kv += dkv
    if STORE_FINAL:
        tl.store(kv_out + st, kv, mask=smask)
        if iv == 0:
            _store_sums(z_out + sz, z, fm)


@triton.jit
def _fwd_out_kernel(
    q, k, v, phq, phk, phw, wf, tm, win_k, win_v, win_m, hkv, hz, o, den_out, seg,
    T, NT, S, scale, softcap,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, LAG: tl.constexpr, BQ: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WIN: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    i, c, bh, b, h, hk, rows, rmask, qrow = _query_block(T, H, HKV, BT, BQ)
    ov = tl.arange(0, BV)
    # Every product takes its operands in the input type (fp32 accumulation), as a 16-bit model would.
    phq_p, phq_n = _load_phi_pair(phq, phq, b, h, rows, T, 0, H, F, BF, False)
    dt = phq_p.dtype

    # Keys older than the two chunks: through the stored state.
    h_p, h_n, z_p, z_n = _load_chunk_state(hkv, hz, bh, c, NT, DV, F, BF, BV, dt)
    acc = _mm(phq_p, h_p, PREC) + _mm(phq_n, h_n, PREC)
    den = tl.sum(phq_p.to(tl.float32) * z_p[None, :], 1) + tl.sum(phq_n.to(tl.float32) * z_n[None, :], 1)

    # Keys of the current chunk.
    pos_c = c * BT + tl.arange(0, BT)
    v_c = _load_rows(v, win_v, b, hk, pos_c, T, S, 0, HKV, DV, BV, HAS_WIN)
    ok_c = _key_ok(tm, win_m, b, pos_c, T, S, HAS_MASK, HAS_WIN)
    if W < BT:
        pk_p, pk_n = _load_phi_pair(phk, phw, b, h, pos_c, T, S, H, F, BF, HAS_WIN)
        lin_c = (pos_c[None, :] <= rows[:, None] - W) & ok_c[None, :]
        p_c = tl.where(lin_c, _mm(phq_p, tl.trans(pk_p), PREC) + _mm(phq_n, tl.trans(pk_n), PREC), 0.0)
    else:
        # A window as long as the chunk covers every pair inside it: no linear term within the chunk.
        p_c = tl.zeros([BQ, BT], dtype=tl.float32)
    if LAG:
        # Keys of the previous chunk (or of the carried window in front of chunk 0).
        pos_p = pos_c - BT
        v_p = _load_rows(v, win_v, b, hk, pos_p, T, S, 0, HKV, DV, BV, HAS_WIN)
        ok_p = _key_ok(tm, win_m, b, pos_p, T, S, HAS_MASK, HAS_WIN)
        if VARLEN:
            # (None where chunk c starts a sequence of a packed row.)
            ok_p = ok_p & _continues(seg, c, NT)
        pkp_p, pkp_n = _load_phi_pair(phk, phw, b, h, pos_p, T, S, H, F, BF, HAS_WIN)
        lin_p = (pos_p[None, :] <= rows[:, None] - W) & ok_p[None, :]
        p_p = tl.where(lin_p, _mm(phq_p, tl.trans(pkp_p), PREC) + _mm(phq_n, tl.trans(pkp_n), PREC), 0.0)
    if W > 0:
        od = tl.arange(0, BD)
        qq = tl.load(q + qrow[:, None] * D + od[None, :], mask=rmask[:, None] & (od[None, :] < D), other=0.0)
        g = tl.sigmoid(tl.load(wf + h).to(tl.float32))
        k_c = _load_rows(k, win_k, b, hk, pos_c, T, S, 0, HKV, D, BD, HAS_WIN)
        s_c, win_c = _window_scores(qq, k_c, rows, pos_c, ok_c, scale, softcap, W, SOFTCAP, PREC, False)
        m = tl.max(s_c, 1)
        if LAG:
            k_p = _load_rows(k, win_k, b, hk, pos_p, T, S, 0, HKV, D, BD, HAS_WIN)
            s_p, win_p = _window_scores(qq, k_p, rows, pos_p, ok_p, scale, softcap, W, SOFTCAP, PREC, False)
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
