"""Chunked Triton forward and backward of the hybrid op, for training and prefill: sizes, launches, autograd.

The kernels live in `triton_chunk_fwd.py` and `triton_chunk_bwd.py`, their shared pieces in `triton_common.py`.
The sequence is cut into chunks of `BLOCK_T` tokens. For a query in chunk c every key older than chunk c - 1 is on
the linear side (the window is at most `BLOCK_T` long), so the forward is

    0. `_phi_kernel`, one program per (`PHI_CHUNKS` chunks, batch, head, queries or keys): the Hedgehog features
       phi_q, phi_k in the input type from one launch (and those of the carried window's keys from another),
       computed once and loaded by every later kernel;
    1. `_fwd_state_kernel`, a sequential pass per (batch, head, half of the features, block of Dv) that stores the
       linear state H_c = kv0 + sum phi_k(k_j) v_j^T over the keys older than chunk c - 1 (older than chunk c when
       W <= 1), and the final state. The halves softmax(x W) and softmax(-x W) of the feature map are independent
       sums, so they run as separate programs: more programs, each with half the serial work per chunk. The
       normaliser's key sums z_c accumulate as products with a block of ones on the tensor cores rather than as
       sums over the chunk's rows, which would reduce across warps, with barriers, at every sequential step (half
       of each step's instructions; docs/BENCHMARKS.md);
    2. `_fwd_out_kernel`, one program per (block of query rows, batch, head): phi_q . H_c plus the exact scores
       against [chunk c - 1, chunk c], each pair going to the window term or to the linear term by its distance.

Storing the features pays against recomputing them inside each kernel (docs/BENCHMARKS.md has both profiles):
the feature map ran seven times per chunk across the passes, and its projection and weights filled the registers
of the gradient kernels. Products take their operands in the input type with fp32 accumulation (tf32x3 for fp32
inputs), as a 16-bit model computes; the per-chunk states are stored in the input type, the final state in fp32.
The backward mirrors the forward and, like flash-attention's, splits the gradient by side:

    1. `_delta_kernel`: the output's gradient factors dN = do / den and d(den) = -do . o / den per query row;
    2. the features and states are recomputed (steps 0 and 1 above; `LINEARIZE_SAVE_STATES=1` keeps them from the
       forward instead), and a reverse pass sums the state gradients dH_c, dz_c of the query chunks after each key
       chunk (one program per half of the features and block of Dv). Both sequential passes keep few programs busy
       for their whole length, so on CUDA the reverse pass runs on a second stream beside the recomputation
       (`_Overlap`);
    3. with a window, `_bwd_q_window_kernel`, one program per (query chunk c, batch, head), takes the window pairs
       from both sides at once: the scores, their row maximum (and its arg-max key, where the maximum's gradient
       goes) and their gradient are computed once, for the window's part of dq, for the dk it sends to key chunk c
       and to key chunk c - 1 (dk_next, per query head in the input type, so that no two programs write the same
       rows), for the dv of key chunk c when the window covers the chunk, and for the window factor's partial
       gradient. Against computing the pairs once from the query side and again from the key side, it does the
       score products once and drops the row maxima kept between the two: 4-6% faster forward+backward on an
       H200 (docs/BENCHMARKS.md). Its dN v^T is also the score gradient of the linear pairs with the same key
       chunks, so it stores, per key chunk, a [rows, keys] tile of the window weights and the linear pairs' score
       gradients, which the linear kernels read instead of computing dN v^T again (2% faster forward+backward than
       each computing it, with the window's dv for chunk c - 1 folded into the key side's). On Hopper it moves its
       tiles through TMA descriptors (`TMA`), which keeps newer Tritons from spilling its registers;
    4. `_bwd_q_linear_kernel`, one program per (block of query rows, batch, head): the gradient of the q
       feature-map pre-activation from the states and the linear pairs, and dq back through wq, plus the window's
       part; then the key side, `_bwd_kv_linear_kernel`, one program per (key chunk, batch, head) that visits the
       (at most two) query chunks whose pairs with the key chunk are not in the states, with its tiles key-major,
       so that every product has the chunk's keys as rows (Hopper's wgmma needs 64): those pairs and the state
       gradient, the window's parts added, written as dk, dv (with the projection back through wk folded in) and
       the gradient of the k feature-map pre-activation. Each program owns its rows, so nothing is written twice by
       concurrent programs (with GQA one torch sum over the group remains);
    5. `_wgrad_kernel`: the weight gradients x^T g of both feature maps from one launch, as split-K partial
       products, summed by one torch op.

Only the gradients asked for are computed. Attention transfer asks for those of the feature maps and the window
factor alone (q, k and v come from frozen projections): the kernels then take none of the products that only dq, dk
or dv need and write none of them, which makes its forward+backward 22-29% faster on an H200. LoRA fine-tuning asks
for those of q, k and v alone: no pre-activation gradient is stored and the weight-gradient launch is left out (6%).

Keys of the window carried in `initial_state` sit at the negative positions -S..-1, in front of the new tokens.

Sequences packed in one row (`chunk_offsets`, B = 1) each start at a chunk: the sequential passes take one row of
programs per sequence, over its own chunks, and the kernels that look one chunk back read each chunk's sequence, so
that nothing reaches from a sequence into the one before it.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from . import save_states, triton_version
from .torch_chunked import HybridState
from .triton_chunk_bwd import (
    _bwd_kv_linear_kernel,
    _bwd_q_linear_kernel,
    _bwd_q_window_kernel,
    _bwd_state_kernel,
    _delta_kernel,
    _wgrad_kernel,
)
from .triton_chunk_fwd import _fwd_out_kernel, _fwd_state_kernel, _phi_kernel
from .triton_common import FP_FUSION

BLOCK_T = 64
# Warps per program of each kernel.
WARPS = {
    "phi": 4, "fwd_state": 4, "fwd_out": 4, "bwd_state": 4, "bwd_q_window": 4, "bwd_q_linear": 4, "bwd_kv_linear": 4,
    "wgrad": 4, "delta": 4,
}  # fmt: skip
# Query rows per program of the forward's output kernel and of the query side's linear kernel, and per step of the
# key-side kernel (divisors of BLOCK_T): fewer rows, smaller tiles beside the key chunks each one holds. The query
# side's window kernel takes a whole chunk per program (the key chunks it writes to are whole).
BQ_OUT = 64
BQ_Q = 64
BQ_KV_LINEAR = 16
# Software-pipelining stages of named kernels, pinned where measured (on an H200, docs/BENCHMARKS.md): the key-side
# kernel keeps three (two and one ran slower). At 4 warps and 3 stages it fits two programs per SM (255 registers,
# 90 KB of shared memory).
STAGES = {"bwd_kv_linear": 3}
# Chunks per program of the feature kernel, which loads and converts its head's weights once for all of them: 4
# made the forward 4% and forward+backward 2% faster than 1 on an H200 (8 the same as 4; docs/BENCHMARKS.md).
PHI_CHUNKS = 4
# Columns of Dv per program of the sequential state passes.
BV_STATE = 64
MAX_DIM = 128
# The query side's window kernel reads and writes its tiles through TMA tensor descriptors (Hopper's tensor memory
# accelerator, built on the host) where it can: None decides per call (a CUDA device of compute capability 9 or
# newer, a Triton of at least `TMA_TRITON`, no carried window, tensors the descriptors can address); True takes them
# wherever the tensors allow, also on the CPU under the interpreter (tests, `compile_check`); False never. On an
# H200 under Triton 3.9 the kernel ran 11% faster with them (forward+backward 2%), as fast as with pointer loads
# under 3.6, whose compiled kernel spills less (docs/BENCHMARKS.md); the other kernels ran slower through
# descriptors, so they keep pointer loads.
TMA: bool | None = None
TMA_TRITON = (3, 6)
# On CUDA, the default backward (features and states recomputed) launches the sequential state-gradient pass on a
# second stream, so that it runs beside the recomputed state pass, which does not depend on it (`_Overlap`).
OVERLAP = True
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One second CUDA stream per device, made on first use."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


class _Overlap:
    """Kernels launched inside `side()` run on a second CUDA stream, beside those launched meanwhile on the current
    one, until `join()`. The sequential state passes hold one program per SM for their whole length, so the GPU's
    other slots go to the kernels beside them. Inline on the CPU and with `OVERLAP` off.

    Every tensor a side kernel touches is allocated on the current stream before `side()` and stays referenced
    until after `join()`, so no memory is handed back while the side stream may still use it.
    """

    def __init__(self, device: torch.device, on: bool = True):
        on = on and OVERLAP and device.type == "cuda"
        self.main = torch.cuda.current_stream(device) if on else None
        self.other = _side_stream(device) if on else None

    @contextlib.contextmanager
    def side(self):
        if self.other is None:
            yield
            return
        self.other.wait_stream(self.main)
        with torch.cuda.stream(self.other):
            yield

    def join(self) -> None:
        if self.other is not None:
            self.main.wait_stream(self.other)


def _tma_device(device: torch.device) -> bool:
    """Whether calls on `device` take the TMA descriptors where their tensors allow (see `TMA`)."""
    if TMA is not None:
        return TMA
    if device.type != "cuda":
        return False
    version = triton_version()
    return version is not None and version >= TMA_TRITON and torch.cuda.get_device_capability(device)[0] >= 9


def _addressable(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a 16-byte aligned base, 16-byte multiples as strides and unit stride in the last
    dimension."""
    return all(
        t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors
    )


def _block_descriptor(t: torch.Tensor, cols: int):
    """Host-side TMA descriptor of a `[B, T, HX, DX]` tensor in blocks of one chunk of one head, `cols` columns
    wide (`_load_block`, `_store_block`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, BLOCK_T, 1, cols])


def _launch(name: str) -> dict:
    """Launch options of a named kernel: its warps, where set its pipelining stages, and fused multiply-adds on
    (`FP_FUSION`)."""
    return {"num_warps": WARPS[name], **FP_FUSION, **({"num_stages": STAGES[name]} if name in STAGES else {})}


def _empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Every buffer a kernel fully overwrites comes from here; the tests swap in a NaN-filled allocation."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _Plan:
    """Sizes, flags and the (int8) masks shared by the kernels of one call."""

    def __init__(self, q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap, seg=None, offs=None):
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
        # A packed row of sequences that each start at a chunk (`chunk_offsets`): each chunk's sequence (for the
        # kernels that look back one chunk) and the sequences' chunk offsets (for the sequential passes, one program
        # row per sequence); the final states are per sequence.
        self.VARLEN = seg is not None
        self.seg = seg if seg is not None else dummy
        self.offs = offs if offs is not None else dummy
        self.R = offs.numel() - 1 if offs is not None else self.B
        # Steps of the longest sequential pass, which the interpreter needs as a constant (`niter`).
        self.longest = int(offs.diff().max()) if offs is not None and self.interpreted else self.NT

    def niter(self, n: int) -> int:
        return n if self.interpreted else 0

    def common(self) -> dict:
        return dict(H=self.H, HKV=self.HKV, D=self.D, DV=self.DV, F=self.F, BT=BLOCK_T, BD=self.BD, BF=self.BF,
                    LAG=self.LAG, PREC=self.PREC, VARLEN=self.VARLEN)  # fmt: skip


def _features(p: _Plan, x, w, x2=None, w2=None):
    """Hedgehog features `[B, T', H, 2F]` in the type of x, for x `[B, T', HX, D]` and weights `[H, D, F]`; with
    x2 and w2 of the same length, theirs too, from the same launch (a pair)."""
    B, T = x.shape[:2]
    phi = _empty(B, T, p.H, 2 * p.F, dtype=x.dtype, device=x.device)
    phi2 = _empty(B, T, p.H, 2 * p.F, dtype=x.dtype, device=x.device) if x2 is not None else phi
    if T:
        steps = min(PHI_CHUNKS, triton.cdiv(T, BLOCK_T))
        _phi_kernel[(triton.cdiv(T, BLOCK_T * steps), B * p.H, 1 if x2 is None else 2)](
            x, w, phi, x if x2 is None else x2, w if w2 is None else w2, phi2, T, H=p.H, HX=x.shape[2],
            HX2=x.shape[2] if x2 is None else x2.shape[2], D=p.D, F=p.F, BT=BLOCK_T, BD=p.BD, BF=p.BF, STEPS=steps,
            **_launch("phi"),
        )  # fmt: skip
    return phi if x2 is None else (phi, phi2)


def _all_features(p: _Plan, q, wq, k, wk):
    """Features of the queries, of the keys and of the carried window's keys, the first two from one launch (the
    keys' tensor stands in for the last when there is no window, since kernels take a pointer even where a flag
    turns it off)."""
    phq, phk = _features(p, q, wq, k, wk)
    return phq, phk, _features(p, p.win_k, wk) if p.S else phk


def _chunk_state_buffers(p: _Plan, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers for per-chunk states or their gradients: `[B, H, NT, 2F, DV]` in `dtype`, `[B, H, NT, 2F]` in fp32."""
    return (
        _empty(p.B, p.H, p.NT, 2 * p.F, p.DV, dtype=dtype, device=device),
        _empty(p.B, p.H, p.NT, 2 * p.F, device=device),
    )


def _states(p: _Plan, phk, phw, v, win_v, kv0, z0, store_final: bool):
    """Per-chunk linear states `[B, H, NT, 2F, DV]` in the input type, `[B, H, NT, 2F]` in fp32 (and the final ones
    of the batch rows or packed sequences, both fp32, if asked)."""
    dev = v.device
    hkv, hz = _chunk_state_buffers(p, v.dtype, dev)
    kv_out = _empty(p.R, p.H, 2 * p.F, p.DV, device=dev) if store_final else hkv
    z_out = _empty(p.R, p.H, 2 * p.F, device=dev) if store_final else hz
    grid = (triton.cdiv(p.DV, p.BV_STATE), p.R * p.H, 2)
    _fwd_state_kernel[grid](
        phk, phw, v, p.tm, win_v, p.wm, kv0 if kv0 is not None else hkv, z0 if z0 is not None else hz,
        hkv, hz, kv_out, z_out, p.offs, p.T, p.NT, p.S, p.SOUT,
        H=p.H, HKV=p.HKV, DV=p.DV, F=p.F, BT=BLOCK_T, BV=p.BV_STATE, BF=p.BF, LAG=p.LAG, PREC=p.PREC,
        HAS_MASK=p.HAS_MASK, HAS_WIN=p.S > 0, HAS_INIT=kv0 is not None, STORE_FINAL=store_final,
        NITER=p.niter(p.longest + p.LAG), VARLEN=p.VARLEN, **_launch("fwd_state"),
    )  # fmt: skip
    return hkv, hz, kv_out, z_out


def _weight_grads(p: _Plan, q, gq, k, gk):
    """The two `[H, D, F]` sums over tokens of x^T g, for (x, g) = (q, gq) and (k, gk) (x `[B, T, HX, D]`, g
    `[B, T, H, F]`), in fp32, split over tokens, from one launch."""
    R = p.B * p.T
    rows_per = max(BLOCK_T, triton.cdiv(triton.cdiv(R, 16), BLOCK_T) * BLOCK_T)
    splits = triton.cdiv(R, rows_per)
    part = _empty(2, splits, p.H, p.D, p.F, device=q.device)
    _wgrad_kernel[(splits, p.H, 2)](
        q, gq, part, k, gk, R, rows_per, q.shape[2], k.shape[2], H=p.H, D=p.D, F=p.F, BR=BLOCK_T, BD=p.BD, BF=p.BF,
        PREC=p.PREC, NITER=p.niter(triton.cdiv(rows_per, BLOCK_T)), **_launch("wgrad"),
    )  # fmt: skip
    return part.sum(1).unbind(0)


class _HybridChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, seg, offs, window, scale,
                softcap, output_final_state):  # fmt: skip
        p = _Plan(q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap, seg, offs)
        win_v = win_v.contiguous() if p.S else v
        phq, phk, phw = _all_features(p, q, wq, k, wk)
        hkv, hz, kv_out, z_out = _states(p, phk, phw, v, win_v, kv0, z0, output_final_state)
        o = _empty(p.B, p.T, p.H, p.DV, dtype=q.dtype, device=q.device)
        den = _empty(p.B, p.T, p.H, device=q.device)
        _fwd_out_kernel[(triton.cdiv(p.T, BQ_OUT), p.B * p.H)](
            q, k, v, phq, phk, phw, wf, p.tm, p.win_k, win_v, p.wm, hkv, hz, o, den, p.seg,
            p.T, p.NT, p.S, p.scale, p.softcap,
            W=p.W, BV=p.BV, HAS_MASK=p.HAS_MASK, HAS_WIN=p.S > 0, SOFTCAP=p.softcap != 0.0, **p.common(),
            BQ=BQ_OUT, **_launch("fwd_out"),
        )  # fmt: skip
        kept = (phq, phk, phw, hkv, hz) if save_states() else (None,) * 5
        ctx.save_for_backward(q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, seg, offs, o, den,
                              *kept)  # fmt: skip
        ctx.plan_args = (window, scale, softcap)
        if not output_final_state:
            return o, None, None
        ctx.mark_non_differentiable(kv_out, z_out)
        return o, kv_out, z_out

    @staticmethod
    def backward(ctx, do, _dkv, _dz):
        q, k, v, wq, wk, wf, token_mask, kv0, z0, win_k, win_v, win_mask, seg, offs, o, den, *kept = ctx.saved_tensors
        window, scale, softcap = ctx.plan_args
        p = _Plan(q, k, v, wq, token_mask, win_k, win_mask, window, scale, softcap, seg, offs)
        win_v = win_v.contiguous() if p.S else v
        B, T, H, D, DV, F, HKV = p.B, p.T, p.H, p.D, p.DV, p.F, p.HKV
        dev = q.device
        # Only the gradients asked for are computed: attention transfer asks for the feature maps' and the window
        # factor's alone (q, k, v come from frozen projections), LoRA fine-tuning for those of q, k and v alone.
        # Without `qkv` the kernels take no product that only dq, dk or dv need and write none of them; without
        # `wgrad` they store no pre-activation gradients and the weight-gradient launch is left out; the window
        # factor's alone needs the window kernel alone.
        need = ctx.needs_input_grad
        qkv, wgrad, wf_grad = any(need[:3]), need[3] or need[4], window > 0 and need[5]
        linear = qkv or wgrad
        if not (linear or wf_grad):
            return (None,) * 18  # one per input of forward
        do = do.contiguous()
        # The output's gradient factors, dN = do / den and d(den), once for the kernels that read them.
        dn = _empty(B, T, H, DV, dtype=q.dtype, device=dev)
        dd = _empty(B, T, H, device=dev)
        rows = B * T * H
        _delta_kernel[(triton.cdiv(rows, 32),)](do, o, den, dn, dd, rows, DV=DV, BR=32, BV=p.BV, **_launch("delta"))
        # The state-gradient pass needs only the query features and dN. By default it runs on the side stream beside
        # the recomputed key features and state pass and the query side (`_Overlap`), which do not depend on it;
        # with saved states, beside the query side alone, it ran slower than one after the other (an H200,
        # docs/BENCHMARKS.md), so there it stays on the current stream.
        saved = kept[0] is not None
        par = _Overlap(dev, on=linear and not saved)
        if linear:
            phq, phk, phw = kept[:3] if saved else _all_features(p, q, wq, k, wk)
            dhkv, dhz = _chunk_state_buffers(p, q.dtype, dev)
            with par.side():
                _bwd_state_kernel[(triton.cdiv(DV, p.BV_STATE), p.R * H, 2)](
                    phq, dn, dd, dhkv, dhz, p.offs, T, p.NT,
                    H=H, DV=DV, F=F, BT=BLOCK_T, BV=p.BV_STATE, BF=p.BF, LAG=p.LAG, PREC=p.PREC,
                    NITER=p.niter(p.longest + p.LAG), VARLEN=p.VARLEN, **_launch("bwd_state"),
                )  # fmt: skip
        try:
            if linear:
                if saved:
                    hkv, hz = kept[3:]
                else:
                    # By default the features and states are recomputed rather than kept from the forward: they are
                    # the largest intermediates (`LINEARIZE_SAVE_STATES`).
                    hkv, hz, _, _ = _states(p, phk, phw, v, win_v, kv0, z0, False)
            lin_flags = dict(W=p.W, BV=p.BV, HAS_MASK=p.HAS_MASK, QKV=qkv, **p.common())
            # Buffers a flag leaves unused are not allocated: a tensor of the call stands in for the pointer.
            groups = H // HKV
            if qkv:
                dq = _empty(B, T, H, D, dtype=q.dtype, device=dev)
                # Per query head, in the input type; with GQA the torch sum below adds each group in fp32 and writes
                # the input type. Partials in fp32 ran 4% slower at 32 query / 8 key-value heads on an H200, and the
                # key side walking a group's heads itself spilled its accumulators and ran 14% slower
                # (docs/BENCHMARKS.md).
                dk = _empty(B, T, H, D, dtype=k.dtype, device=dev)
                dv = _empty(B, T, H, DV, dtype=v.dtype, device=dev)
                # What each query chunk sends through the window to the key chunk before its own.
                dk_next = _empty(B, T, H, D, dtype=k.dtype, device=dev) if window > 0 and p.LAG else dk
            else:
                dq = dk = dv = dk_next = dn
            # The window kernel's [rows, keys] tiles of the pairs with the own and the previous key chunk (where a
            # flag leaves one unused, the other stands in: the key side picks between them by pointer).
            own, prev = 0 < window < BLOCK_T, window > 0 and p.LAG
            xc = _empty(B, T, H, BLOCK_T, dtype=q.dtype, device=dev) if own else None
            xp = _empty(B, T, H, BLOCK_T, dtype=q.dtype, device=dev) if prev else None
            stand_in = xc if own else xp if prev else dd
            xc, xp = xc if own else stand_in, xp if prev else stand_in
            dwf = _empty(B * H * p.NT, device=dev) if window > 0 else den
            if window > 0:
                # The window's part of dq, dk, dv first, which the linear kernels then add to.
                # Its tiles, with the columns of their blocks: through TMA descriptors where it can (`TMA`).
                tiles = {"q": (q, p.BD), "k": (k, p.BD), "v": (v, p.BV), "dn": (dn, p.BV),
                         **({"dq": (dq, p.BD), "dk": (dk, p.BD), "dv": (dv, p.BV), "dk_next": (dk_next, p.BD)}
                            if qkv else {}),
                         **({"xc": (xc, BLOCK_T)} if own else {}), **({"xp": (xp, BLOCK_T)} if prev else {})}  # fmt: skip
                tma = not p.S and _tma_device(dev) and _addressable(*(t for t, _ in tiles.values()))
                tiles = {name: _block_descriptor(t, cols) if tma else t for name, (t, cols) in tiles.items()}
                # Without qkv the outputs' stand-in is dn, which the kernel then only reads.
                out = {name: tiles.get(name, tiles["dn"]) for name in ("dq", "dk", "dv", "dk_next")}
                _bwd_q_window_kernel[(p.NT, B * H)](
                    tiles["q"], tiles["k"], tiles["v"], wf, p.tm, p.win_k, win_v, p.wm, tiles["dn"], dd,
                    out["dq"], out["dk"], out["dv"], out["dk_next"], tiles.get("xc", xc), tiles.get("xp", xp),
                    dwf, p.seg, T, p.NT, p.S, p.scale, p.softcap,
                    HAS_WIN=p.S > 0, SOFTCAP=p.softcap != 0.0, TMA=tma, **lin_flags, **_launch("bwd_q_window"),
                )  # fmt: skip
            if linear:
                # The pre-activation gradients go to the weight-gradient products in the input type.
                dpq = _empty(B, T, H, F, dtype=q.dtype, device=dev) if wgrad else dd
                _bwd_q_linear_kernel[(triton.cdiv(T, BQ_Q), B * H)](
                    v, phq, phk, phw, wq, p.tm, win_v, p.wm, hkv, hz, dn, dd, xc, xp, dq, dpq, p.seg, T, p.NT, p.S,
                    HAS_WIN=p.S > 0, WGRAD=wgrad, **lin_flags, BQ=BQ_Q, **_launch("bwd_q_linear"),
                )  # fmt: skip
                dpk = _empty(B, T, H, F, dtype=q.dtype, device=dev) if wgrad else dd
        finally:
            # The key side reads the state gradients; and should anything above raise, no buffer the side stream
            # still uses is handed back before it is done.
            par.join()
        if linear:
            _bwd_kv_linear_kernel[(p.NT, B * H)](
                phq, phk, v, wk, p.tm, p.wm, dhkv, dhz, do, den, dd, dn, xc, xp, dk, dv, dk_next, dpk, p.seg, T, p.NT,
                p.S,
                WGRAD=wgrad, **lin_flags, BQ=BQ_KV_LINEAR, **_launch("bwd_kv_linear"),
            )  # fmt: skip
        if qkv and groups > 1:
            dk = dk.view(B, T, HKV, groups, D).sum(3)
            dv = dv.view(B, T, HKV, groups, DV).sum(3)
        dwq, dwk = _weight_grads(p, q, dpq, k, dpk) if wgrad else (None, None)
        grads = (
            dq if need[0] else None,
            dk if need[1] else None,
            dv if need[2] else None,
            dwq.to(wq.dtype) if need[3] else None,
            dwk.to(wk.dtype) if need[4] else None,
            dwf.view(B, H, p.NT).sum((0, 2)).to(wf.dtype) if wf_grad else None,
        )
        return grads + (None,) * 12


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
    chunk_offsets: torch.Tensor | None = None,
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
        chunk_offsets: `[N + 1]` integer offsets, in chunks of `BLOCK_T` tokens, of N sequences packed in one row
            (B = 1, T = `BLOCK_T * chunk_offsets[-1]`; a sequence shorter than its chunks is padded in front with
            masked tokens). Each attends only to itself, `initial_state` and the final state have batch N, and the
            windows carried in and out are tokens of the row: the initial state's window is not read (place it in
            front of each sequence's tokens, as `varlen.py` does) and the final one holds each sequence's last
            tokens.

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
    seg = _segments(chunk_offsets, B, T, st) if chunk_offsets is not None else None
    has_win = st is not None and slots > 0 and seg is None
    o, kv, ksum = _HybridChunk.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), wq.contiguous(), wk.contiguous(), wf.contiguous(),
        token_mask, st.kv.contiguous() if st is not None else None, st.ksum.contiguous() if st is not None else None,
        st.win_k.to(q.dtype) if has_win else None, st.win_v.to(q.dtype) if has_win else None,
        st.win_mask if has_win else None, seg, chunk_offsets, window, scale, softcap, output_final_state,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    if seg is not None:
        return o, HybridState(kv, ksum, *_final_windows(k, v, token_mask, chunk_offsets, slots))
    return o, HybridState(kv, ksum, *_final_window(k, v, token_mask, st, slots))


def _segments(chunk_offsets, B, T, state):
    """Each chunk's sequence (`[NT]` int32, on the device), checked against the inputs."""
    n = chunk_offsets.numel() - 1
    if B != 1 or T % BLOCK_T or n < 1:
        raise ValueError(f"chunk_offsets needs a packed row of whole chunks (batch 1, T a multiple of {BLOCK_T}), "
                         f"got batch {B}, T {T}")  # fmt: skip
    if state is not None and state.kv.shape[0] != n:
        raise ValueError(f"initial_state holds {state.kv.shape[0]} sequences, chunk_offsets {n}")
    counts = chunk_offsets.diff()
    seg = torch.repeat_interleave(torch.arange(n, dtype=torch.int32, device=counts.device), counts,
                                  output_size=T // BLOCK_T)  # fmt: skip
    return seg


def _final_windows(k, v, token_mask, chunk_offsets, slots):
    """`_final_window` of each sequence of a packed row (`chunk_offsets`): the last `slots` tokens before each
    sequence's end, which a sequence's chunks always hold (slots < `BLOCK_T`)."""
    at = (chunk_offsets[1:].long() * BLOCK_T - slots)[:, None] + torch.arange(slots, device=k.device)
    mask = token_mask[0] if token_mask is not None else torch.ones(k.shape[1], dtype=torch.bool, device=k.device)
    return k[0, at].clone(), v[0, at].clone(), mask[at].clone()


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
