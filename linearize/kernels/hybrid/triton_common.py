"""Triton building blocks shared by the chunked hybrid kernels: loads of rows, masks and features, the Hedgehog
feature map and its gradient, window scores and the output's gradient factors.

Every function here is `@triton.jit` and inlined into the kernels of `triton_chunk_fwd.py` and `triton_chunk_bwd.py`.
"""

import triton
import triton.language as tl

from .naive import EPS as _EPS_VALUE

# Kernels read globals only as constexpr.
EPS = tl.constexpr(_EPS_VALUE)
NO_KEY = tl.constexpr(-(2**30))
# Launch option of every kernel: contract multiplies and adds into fused multiply-adds. Triton 3.9 warns when it is
# left unset and 3.10 turns it off by default; set here, the kernels compile the same on every version.
FP_FUSION = {"enable_fp_fusion": True}


@triton.jit
def _heads(bh, H: tl.constexpr, HKV: tl.constexpr):
    # Batch, query head and key/value head (GQA: HKV heads shared by groups of H // HKV) of program row bh.
    h = bh % H
    return bh // H, h, h // (H // HKV)


@triton.jit
def _query_block(T, H: tl.constexpr, HKV: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr):
    # Program (i, bh) of the output and query-side kernels covers the BQ query rows from i * BQ on, in chunk c, of
    # row bh; returns i, c, bh, b, h, hk, the rows, their in-sequence mask and their row index into [B, T, H] tensors.
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = _heads(bh, H, HKV)
    rows = i * BQ + tl.arange(0, BQ)
    qrow = (b * T + rows).to(tl.int64) * H + h
    return i, i // (BT // BQ), bh, b, h, hk, rows, rows < T, qrow


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _weighted_col_sums(x, w, BT: tl.constexpr, PREC: tl.constexpr):
    # [BF, 16] tile whose every column is x^T w, for rows x [BT, BF] and row weights w [BT] (fp32), computed as a
    # product on the tensor cores: a sum over rows would reduce across warps, with barriers, at every step of a
    # sequential pass. For 16-bit x the weights enter as a high and a low 16-bit part (about 16 bits of mantissa).
    wt = tl.broadcast_to(w[:, None], [BT, 16])
    xt = tl.trans(x)
    if PREC == "tf32x3":
        return _mm(xt, wt, PREC)
    hi = wt.to(x.dtype)
    return _mm(xt, hi, PREC) + _mm(xt, (wt - hi.to(tl.float32)).to(x.dtype), PREC)


@triton.jit
def _col_sums(x, BT: tl.constexpr, PREC: tl.constexpr):
    # [BF, 16] tile whose every column is the sum of the rows x [BT, BF]: `_weighted_col_sums` with unit weights,
    # which every type holds exactly (one product).
    return _mm(tl.trans(x), tl.full([BT, 16], 1.0, dtype=x.dtype), PREC)


@triton.jit
def _store_sums(ptrs, sums, mask):
    # Per-feature sums at the pointers `ptrs` ([BF]) from column 0 of a [BF, 16] tile of equal columns
    # (`_col_sums`, `_weighted_col_sums`).
    oc = tl.arange(0, 16)[None, :]
    tl.store(ptrs[:, None] + oc * 0, sums, mask=mask[:, None] & (oc == 0))


@triton.jit
def _load_w(w_ptr, h, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    od = tl.arange(0, BD)
    of = tl.arange(0, BF)
    wmask = (od[:, None] < D) & (of[None, :] < F)
    return tl.load(w_ptr + h * D * F + od[:, None] * F + of[None, :], mask=wmask, other=0.0).to(tl.float32)


@triton.jit
def _load_w_as(w_ptr, h, dt: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    # The feature-map weights of head h in the type the projection of inputs of type dt takes (`_proj_w`).
    return _load_w(w_ptr, h, D, F, BD, BF).to(dt)


@triton.jit
def _proj_w(x, w):
    # x W for weights w from `_load_w_as`: fp32 inputs keep near-fp32 accuracy (tf32x3); 16-bit inputs use the
    # weights in their type, as a 16-bit model would, with fp32 accumulation.
    if x.dtype == tl.float32:
        return tl.dot(x, w, input_precision="tf32x3")
    return tl.dot(x, w)


@triton.jit
def _softmax_half(proj, sign, F: tl.constexpr, BF: tl.constexpr):
    # softmax(sign * proj) over the F real features; sign is +1 or -1 (negation is exact).
    fmask = (tl.arange(0, BF) < F)[None, :]
    pp = tl.where(fmask, proj * sign, float("-inf"))
    ep = tl.exp(pp - tl.max(pp, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None]


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
def _load_block(x, win_ptr, b, hx, t0, T, S, HX: tl.constexpr, DX: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr,
                HAS_WIN: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    # Rows t0..t0 + BT of head hx of a [B, T, HX, DX] tensor as a [BT, BX] tile: with TMA, x is its tensor descriptor
    # (blocks [1, BT, 1, BX]; rows outside 0..T - 1 and columns past DX read as zeros), else `_load_rows`.
    if TMA:
        return x.load([b, t0, hx, 0]).reshape(BT, BX)
    else:
        return _load_rows(x, win_ptr, b, hx, t0 + tl.arange(0, BT), T, S, 0, HX, DX, BX, HAS_WIN)


@triton.jit
def _store_block(x, val, b, hx, t0, T, HX: tl.constexpr, DX: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr,
                 TMA: tl.constexpr, WHOLE: tl.constexpr = False):  # fmt: skip
    # Stores the [BT, BX] tile val (in the tensor's type) as rows t0..t0 + BT (t0 >= 0) of head hx of a
    # [B, T, HX, DX] tensor, leaving out rows past T (none when WHOLE) and columns past DX: with TMA through its
    # tensor descriptor.
    if TMA:
        x.store([b, t0, hx, 0], val.reshape(1, BT, 1, BX))
    else:
        pos = t0 + tl.arange(0, BT)
        offs = tl.arange(0, BX)
        rows = (b * T + pos).to(tl.int64) * HX + hx
        mask = (offs < DX)[None, :]
        if not WHOLE:
            mask = mask & (pos < T)[:, None]
        tl.store(x + rows[:, None] * DX + offs[None, :], val, mask=mask)


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
def _continues(seg, c, NT):
    # In a packed row (B == 1) whose sequences each start at a chunk, seg [NT] holding each chunk's sequence: whether
    # chunk c belongs to the sequence of chunk c - 1 (never for chunk 0 nor past the last chunk), that is, whether
    # chunk c's queries may see chunk c - 1's keys.
    inside = (c > 0) & (c < NT)
    return inside & (tl.load(seg + c - 1, mask=inside, other=0) == tl.load(seg + c, mask=inside, other=-1))


@triton.jit
def _row_chunks(offs, r, T, NT, BT: tl.constexpr, VARLEN: tl.constexpr):
    # The chunks a sequential pass of row r walks: (first chunk, chunk count, first and end token, batch row). Batch
    # row r, or with VARLEN the sequence r of a packed row (B == 1) whose chunks are offs[r]..offs[r + 1].
    if VARLEN:
        c0 = tl.load(offs + r).to(tl.int32)
        nt = tl.load(offs + r + 1).to(tl.int32) - c0
        return c0, nt, c0 * BT, (c0 + nt) * BT, 0
    else:
        return 0, NT, 0, T, r


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
def _load_phi_pair(ph_ptr, phw_ptr, b, h, pos, T, S, H: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                   HAS_WIN: tl.constexpr):  # fmt: skip
    # Both halves, softmax(x W) and softmax(-x W), of the features of the rows `pos` (see `_load_phi`).
    return (
        _load_phi(ph_ptr, phw_ptr, b, h, pos, T, S, 0, H, F, BF, HAS_WIN),
        _load_phi(ph_ptr, phw_ptr, b, h, pos, T, S, F, H, F, BF, HAS_WIN),
    )


@triton.jit
def _load_chunk_state(h_ptr, z_ptr, bh, c, NT, DV: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                      BV: tl.constexpr, dt: tl.constexpr):  # fmt: skip
    # Chunk c's stored `[2F, DV]` state (or state gradient) of row bh as its two feature halves in type dt, and its
    # `[2F]` normaliser halves in fp32.
    of = tl.arange(0, BF)
    ov = tl.arange(0, BV)
    smask = (of[:, None] < F) & (ov[None, :] < DV)
    hst = ((bh * NT + c) * 2 * F + of[:, None]).to(tl.int64) * DV + ov[None, :]
    h_p = tl.load(h_ptr + hst, mask=smask, other=0.0).to(dt)
    h_n = tl.load(h_ptr + hst + F * DV, mask=smask, other=0.0).to(dt)
    z_p = tl.load(z_ptr + (bh * NT + c) * 2 * F + of, mask=of < F, other=0.0)
    z_n = tl.load(z_ptr + (bh * NT + c) * 2 * F + F + of, mask=of < F, other=0.0)
    return h_p, h_n, z_p, z_n


@triton.jit
def _soft_cap(s, softcap):
    # softcap * tanh(s / softcap), tanh through exp: the interpreter and every backend have it.
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))


@triton.jit
def _soft_cap_grad(ds, s, inside, softcap):
    # Gradient through the soft-cap: s = c tanh(r / c), so ds/dr = 1 - (s / c)^2 (entries outside the window, where
    # s is -inf, are left as they are).
    sc = tl.where(inside, s / softcap, 0.0)
    return ds * (1.0 - sc * sc)


@triton.jit
def _inv_den(den):
    # 1 / den of the output rows; a row without any key has den == EPS and sends nothing back (each of its terms has
    # a zero factor), so its 1 / den is taken as 0, which keeps dN = do / den finite in fp16.
    return tl.where(den > EPS, 1.0 / den, 0.0)


@triton.jit
def _window_scores(q, kk, rows, pos, ok, scale, softcap, W: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                   KEY_MAJOR: tl.constexpr):  # fmt: skip
    # Scores of the query rows `rows` against the keys `pos` inside the window (-inf elsewhere) and the window mask,
    # both [rows, keys], or [keys, rows] when KEY_MAJOR.
    if KEY_MAJOR:
        s = _mm(kk, tl.trans(q), PREC) * scale
        r, p, o = rows[None, :], pos[:, None], ok[:, None]
    else:
        s = _mm(q, tl.trans(kk), PREC) * scale
        r, p, o = rows[:, None], pos[None, :], ok[None, :]
    if SOFTCAP:
        s = _soft_cap(s, softcap)
    inside = (p <= r) & (p > r - W) & o
    return tl.where(inside, s, float("-inf")), inside


@triton.jit
def _load_out_grads(dn, dd_ptr, qrow, rmask, c0, DV: tl.constexpr, BV: tl.constexpr):
    # y = N / den: dN = do / den (columns c0.. of the rows `qrow`) and d(den) = -do . y / den, as `_delta_kernel`
    # stored them; rows past T load as zeros.
    ov = c0 + tl.arange(0, BV)
    dN = tl.load(dn + qrow[:, None] * DV + ov[None, :], mask=rmask[:, None] & (ov[None, :] < DV), other=0.0)
    return dN, tl.load(dd_ptr + qrow, mask=rmask, other=0.0)


@triton.jit
def _load_do_scaled(do, den_ptr, dd_ptr, qrow, rmask, DV: tl.constexpr, BV: tl.constexpr):
    # The raw do of the rows `qrow` with their 1 / den (as `_delta_kernel` takes it) and d(den): for kernels that
    # apply the 1 / den to their products instead of loading dN.
    ov = tl.arange(0, BV)
    dd = tl.load(do + qrow[:, None] * DV + ov[None, :], mask=rmask[:, None] & (ov[None, :] < DV), other=0.0)
    rden = _inv_den(tl.load(den_ptr + qrow, mask=rmask, other=1.0))
    return dd, rden, tl.load(dd_ptr + qrow, mask=rmask, other=0.0)
