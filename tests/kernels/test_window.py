"""The window branch (sliding-window softmax with sink logits): chunked path with its carried state vs naive.py."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels.window import window_chunk_torch, window_naive


def rel_rmse(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    "B,T,H,Hkv,D,W,split,pad,sinks,softcap",
    [
        pytest.param(2, 63, 4, 2, 60, 8, 20, 0, 2, None, id="B2-T63-H4-Hkv2-D60-W8-sinks2"),
        pytest.param(1, 40, 2, 2, 16, 64, 39, 0, 0, None, id="B1-T40-H2-D16-W64"),
        pytest.param(2, 30, 2, 1, 16, 4, 11, 7, 4, 5.0, id="B2-T30-H2-Hkv1-W4-leftpad-softcap-sinks4"),
        pytest.param(1, 17, 2, 2, 8, 1, 5, 0, 1, None, id="B1-T17-W1-sink"),
    ],
)
def test_chunked_with_carried_state_matches_naive(B, T, H, Hkv, D, W, split, pad, sinks, softcap):
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=gen).requires_grad_() for s in ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, 6))]
    sink = torch.randn(H, sinks, generator=gen).requires_grad_() if sinks else None
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :pad] = False
    scale = D**-0.5
    num, den = window_naive(*leaves, W, scale, sink, softcap, mask)
    # Two calls, the second continuing from the first's ring buffer, chunks of 8.
    q, k, v = leaves
    n1, d1, state = window_chunk_torch(q[:, :split], k[:, :split], v[:, :split], W, scale, sink, softcap,
                                       mask[:, :split], output_final_state=True, chunk_size=8)  # fmt: skip
    n2, d2, _ = window_chunk_torch(q[:, split:], k[:, split:], v[:, split:], W, scale, sink, softcap, mask[:, split:],
                                   initial_state=state, chunk_size=8)  # fmt: skip
    got_num, got_den = torch.cat([n1, n2], 1), torch.cat([d1, d2], 1)
    assert rel_rmse(got_num, num) < 1e-6 and rel_rmse(got_den, den) < 1e-6
    params = leaves + ([sink] if sink is not None else [])
    dn, dd = torch.randn(num.shape, generator=gen), torch.randn(den.shape, generator=gen)
    want = torch.autograd.grad((num * dn).sum() + (den * dd).sum(), params)
    got = torch.autograd.grad((got_num * dn).sum() + (got_den * dd).sum(), params)
    for name, a, b in zip(["dq", "dk", "dv", "dsinks"], got, want, strict=False):
        assert rel_rmse(a, b) < 1e-5, name


def test_window_is_exact_softmax_over_the_last_w_tokens():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, 1, 4, generator=gen) for _ in range(3))
    num, den = window_naive(q, k, v, 3, 0.5)
    i = 7
    scores = (q[0, i, 0] @ k[0, i - 2 : i + 1, 0].T) * 0.5
    want = torch.softmax(scores, -1) @ v[0, i - 2 : i + 1, 0]
    torch.testing.assert_close(num[0, i, 0] / den[0, i, 0], want)
