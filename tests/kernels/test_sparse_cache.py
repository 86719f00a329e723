"""The sparse-cache hybrid op (LoLA, and learned eviction): the blockwise PyTorch path against the token-by-token
reference on outputs, final states and every gradient; decoding in pieces against one call; packed sequences; the
tie rule of the selection; the state's cache protocol."""

import importlib.util
from pathlib import Path

import pytest
import torch

from linearize.attention.eviction import TokenScorer
from linearize.kernels.hybrid import hybrid_attention_chunked
from linearize.kernels.hybrid.sparse import SparseState, sparse_hybrid_attention
from linearize.kernels.hybrid.sparse_naive import sparse_hybrid_attention_naive

SCALE = 0.35
STATE_NAMES = ("kv", "ksum", "tail_k", "tail_v", "tail_mask", "cache_k", "cache_v", "cache_pos", "tail_x",
               "cache_score")  # fmt: skip


def make_inputs(B, T, H, Hkv, D, F, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    return (rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D), rand(H, D, F, scale=0.5),
            rand(H, D, F, scale=0.5), rand(H))  # fmt: skip


def assert_states_equal(got: SparseState, want: SparseState):
    assert got.seen == want.seen and len(got.tensors()) == len(want.tensors())
    for name, a, b in zip(STATE_NAMES, got.tensors(), want.tensors(), strict=False):
        assert a.shape == b.shape, name
        if a.dtype in (torch.bool, torch.long):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


CASES = [
    # B, T, H, Hkv, D, F, W, C, K, padding
    pytest.param(2, 23, 4, 2, 8, 4, 4, 3, 2, True, id="B2-T23-GQA2-W4-C3-K2-pad"),
    pytest.param(1, 17, 2, 2, 6, 3, 3, 5, 3, False, id="B1-T17-W3-C5-K3"),
    pytest.param(2, 11, 4, 2, 8, 4, 2, 2, 40, True, id="B2-T11-K-beyond-candidates-pad"),
    pytest.param(1, 10, 4, 1, 4, 2, 1, 1, 2, False, id="B1-T10-GQA4-W1-C1"),
    pytest.param(1, 19, 2, 1, 8, 4, 5, None, 3, False, id="B1-T19-C-default-window"),
]


def _mask(B, T, padding):
    mask = torch.ones(B, T, dtype=torch.bool)
    if padding:
        mask[-1, :3] = False
        mask[-1, T // 2] = False
    return mask


@pytest.mark.parametrize("B, T, H, Hkv, D, F, W, C, K, padding", CASES)
def test_prefill_equals_the_reference_on_outputs_states_and_gradients(B, T, H, Hkv, D, F, W, C, K, padding):
    inputs = make_inputs(B, T, H, Hkv, D, F)
    mask = _mask(B, T, padding)
    kw = dict(window=W, scale=SCALE, token_mask=mask, cache_size=K, block=C)
    out, state = sparse_hybrid_attention(*inputs, output_final_state=True, **kw)
    ref, ref_state = sparse_hybrid_attention_naive(*inputs, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert_states_equal(state, ref_state)
    # Something is kept (the test would not see the cache otherwise), and never a padding token.
    kept = state.cache_pos[state.cache_pos >= 0]
    assert kept.numel() > 0
    for b, kvh, slot in (state.cache_pos >= 0).nonzero().tolist():
        assert mask[b, state.cache_pos[b, kvh, slot]]

    def loss(o, s):
        return (o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.kv.sum() + s.ksum.sum() + s.cache_v.pow(2).sum()

    grads = torch.autograd.grad(loss(out, state), inputs)
    want = torch.autograd.grad(loss(ref, ref_state), inputs)
    for name, g, w in zip(("q", "k", "v", "wq", "wk", "window_factor"), grads, want, strict=True):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cuts", [[7], [1, 2, 3, 9], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
def test_prefill_then_steps_equals_one_call(cuts):
    B, T, H, Hkv, D, F = 2, 19, 4, 2, 8, 4
    inputs = make_inputs(B, T, H, Hkv, D, F, seed=1)
    q, k, v, *weights = inputs
    mask = _mask(B, T, True)
    kw = dict(window=3, scale=SCALE, cache_size=2, block=4, output_final_state=True)
    with torch.no_grad():
        full, full_state = sparse_hybrid_attention(q, k, v, *weights, token_mask=mask, **kw)
        outs, state = [], None
        for a, b in zip([0, *cuts], [*cuts, T], strict=True):
            part = slice(a, b)
            out, state = sparse_hybrid_attention(q[:, part], k[:, part], v[:, part], *weights,
                                                 token_mask=mask[:, part], initial_state=state, **kw)  # fmt: skip
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-5)
    assert_states_equal(state, full_state)


def test_no_cache_is_the_plain_op():
    inputs = make_inputs(2, 21, 4, 2, 8, 4, seed=2)
    mask = _mask(2, 21, True)
    out, _ = sparse_hybrid_attention(*inputs, window=4, scale=SCALE, token_mask=mask, cache_size=0, block=3)
    plain, _ = hybrid_attention_chunked(*inputs, window=4, scale=SCALE, token_mask=mask)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("learned", [False, True], ids=["recall", "learned"])
def test_packed_sequences_run_each_on_its_own(learned):
    q, k, v, *weights = make_inputs(1, 20, 4, 2, 8, 4, seed=3)
    x = torch.randn(1, 20, 2, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(window=4, scale=SCALE, cache_size=2, block=3, output_final_state=True)
    if learned:
        kw["scorer"] = _scorer(2, 16, 2)
    with torch.no_grad():
        out, state = sparse_hybrid_attention(q, k, v, *weights, cu_seqlens=torch.tensor([0, 8, 20]), score_x=x, **kw)
        for a, b, n in ((0, 8, 0), (8, 20, 1)):
            alone, alone_state = sparse_hybrid_attention(q[:, a:b], k[:, a:b], v[:, a:b], *weights,
                                                         score_x=x[:, a:b], **kw)  # fmt: skip
            torch.testing.assert_close(out[:, a:b], alone)
            torch.testing.assert_close(state.cache_pos[n], alone_state.cache_pos[0])


def test_selection_keeps_the_later_position_on_ties_and_is_deterministic():
    # Every token has the same key and value: every candidate has the same recall error.
    B, T, H, Hkv, D, F = 1, 16, 2, 1, 4, 2
    q, _, _, wq, wk, wf = make_inputs(B, T, H, Hkv, D, F, seed=4)
    k = torch.ones(B, T, Hkv, D)
    v = torch.ones(B, T, Hkv, D)
    kw = dict(window=2, scale=SCALE, cache_size=3, block=4, output_final_state=True)
    with torch.no_grad():
        _, state = sparse_hybrid_attention(q, k, v, wq, wk, wf, **kw)
        _, again = sparse_hybrid_attention(q, k, v, wq, wk, wf, **kw)
        _, ref = sparse_hybrid_attention_naive(q, k, v, wq, wk, wf, window=2, scale=SCALE, cache_size=3, block=4)
    # The last boundary is after token 15; tokens up to 15 - 2 + 1 = 14 have left the window: keep 12, 13, 14.
    assert state.cache_pos.tolist() == [[[12, 13, 14]]]
    assert torch.equal(again.cache_pos, state.cache_pos) and torch.equal(ref.cache_pos, state.cache_pos)


def test_the_worst_recalled_token_is_kept():
    # One token's value is far from all the others': the linear state recalls it worst.
    B, T, H, Hkv, D, F = 1, 12, 2, 1, 4, 2
    q, k, v, wq, wk, wf = (t.detach() for t in make_inputs(B, T, H, Hkv, D, F, seed=5))
    v = 0.01 * v
    v[0, 3] = 50.0
    _, state = sparse_hybrid_attention(q, k, v, wq, wk, wf, window=2, scale=SCALE, cache_size=1, block=4,
                                       output_final_state=True)  # fmt: skip
    assert state.cache_pos.tolist() == [[[3]]]


def test_state_follows_the_cache_protocol():
    q, k, v, *weights = (t.detach() for t in make_inputs(3, 9, 4, 2, 8, 4, seed=6))
    _, state = sparse_hybrid_attention(q, k, v, *weights, window=2, scale=SCALE, cache_size=2, block=2,
                                       output_final_state=True)  # fmt: skip
    picked = state.index_select(torch.tensor([2, 0]))
    assert picked.seen == state.seen == 9
    assert torch.equal(picked.cache_pos[0], state.cache_pos[2]) and torch.equal(picked.kv[1], state.kv[0])
    repeated = state.repeat_interleave(2)
    assert repeated.cache_k.shape[0] == 6 and torch.equal(repeated.tail_k[3], state.tail_k[1])
    moved = state.to(torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(moved.tensors(), state.tensors(), strict=True))
    # A beam's continuation from a selected state equals the continuation of that row alone.
    step = [t[:, -1:] for t in (q, k, v)]
    with torch.no_grad():
        out, _ = sparse_hybrid_attention(*[t[[2, 0]] for t in step], *weights, window=2, scale=SCALE, cache_size=2,
                                         block=2, initial_state=picked)  # fmt: skip
        alone, _ = sparse_hybrid_attention(*[t[[2]] for t in step], *weights, window=2, scale=SCALE, cache_size=2,
                                           block=2, initial_state=state.index_select(torch.tensor([2])))  # fmt: skip
    torch.testing.assert_close(out[:1], alone)


def _scorer(Hkv, E, seed):
    """A scorer with a random last layer (a new one scores every token 0, which chooses as the recall error)."""
    torch.manual_seed(seed)
    scorer = TokenScorer(Hkv, E)
    torch.nn.init.normal_(scorer.proj.weight, std=8.0)
    return scorer


@pytest.mark.parametrize("B, T, H, Hkv, D, W, C, K, padding", [
    pytest.param(2, 25, 4, 2, 8, 4, 3, 2, True, id="B2-T25-GQA2-W4-C3-K2-pad"),
    pytest.param(1, 18, 2, 1, 8, 5, 5, 3, False, id="B1-T18-W5-C5-K3"),
])  # fmt: skip
def test_learned_eviction_equals_the_reference_on_outputs_states_and_every_gradient(B, T, H, Hkv, D, W, C, K, padding):
    inputs = make_inputs(B, T, H, Hkv, D, 4, seed=7)
    mask = _mask(B, T, padding)
    x = torch.randn(B, T, Hkv, 2 * D, generator=torch.Generator().manual_seed(8)).requires_grad_()
    scorer = _scorer(Hkv, 2 * D, 0)
    kw = dict(window=W, scale=SCALE, token_mask=mask, cache_size=K, block=C, scorer=scorer, score_x=x)
    out, state = sparse_hybrid_attention(*inputs, output_final_state=True, **kw)
    ref, ref_state = sparse_hybrid_attention_naive(*inputs, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert_states_equal(state, ref_state)
    # The scorer chose: the kept pairs are not those the recall error keeps, unless its scores are all 0.
    recall_kw = dict(window=W, scale=SCALE, token_mask=mask, cache_size=K, block=C, output_final_state=True)
    _, recall = sparse_hybrid_attention(*inputs, **recall_kw)
    assert not torch.equal(recall.cache_pos, state.cache_pos)
    with torch.no_grad():
        _, fresh = sparse_hybrid_attention(*inputs, **recall_kw, scorer=TokenScorer(Hkv, 2 * D), score_x=x)
    assert torch.equal(fresh.cache_pos, recall.cache_pos)
    assert (state.cache_pos >= 0).any()

    def loss(o, s):
        return (o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.kv.sum() + s.ksum.sum() + s.cache_v.pow(2).sum()

    wrt = (*inputs, x, *scorer.parameters())
    grads = torch.autograd.grad(loss(out, state), wrt)
    want = torch.autograd.grad(loss(ref, ref_state), wrt)
    names = ("q", "k", "v", "wq", "wk", "window_factor", "score_x", *(n for n, _ in scorer.named_parameters()))
    for name, g, w in zip(names, grads, want, strict=True):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4, msg=name)
    # The scores get a gradient: the scorer can learn.
    assert dict(zip(names, grads, strict=True))["proj.weight"].abs().sum() > 0


def test_learned_eviction_in_pieces_equals_one_call():
    B, T, H, Hkv, D = 2, 23, 4, 2, 8
    q, k, v, *weights = (t.detach() for t in make_inputs(B, T, H, Hkv, D, 4, seed=9))
    x = torch.randn(B, T, Hkv, 2 * D, generator=torch.Generator().manual_seed(10))
    mask = _mask(B, T, True)
    scorer = _scorer(Hkv, 2 * D, 1)
    kw = dict(window=4, scale=SCALE, cache_size=2, block=3, output_final_state=True, scorer=scorer)
    with torch.no_grad():
        full, full_state = sparse_hybrid_attention(q, k, v, *weights, token_mask=mask, score_x=x, **kw)
        outs, state = [], None
        for a, b in zip([0, 5, 6, 7, 13], [5, 6, 7, 13, T], strict=True):
            out, state = sparse_hybrid_attention(q[:, a:b], k[:, a:b], v[:, a:b], *weights, token_mask=mask[:, a:b],
                                                 initial_state=state, score_x=x[:, a:b], **kw)  # fmt: skip
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-5)
    assert_states_equal(state, full_state)


def test_a_high_score_outweighs_the_recall_error():
    # The scorer reads one channel of x: token 2 scores far above the rest and stays, though its value is recalled
    # well; without the scorer the worst-recalled token stays.
    B, T, H, Hkv, D = 1, 12, 2, 1, 4
    q, k, v, wq, wk, wf = (t.detach() for t in make_inputs(B, T, H, Hkv, D, 2, seed=5))
    v = 0.01 * v
    v[0, 7] = 50.0
    x = torch.zeros(B, T, Hkv, 4)
    x[0, 2, 0, 0] = 100.0

    class ReadOne(torch.nn.Module):
        margin = 0

        def forward(self, x, ok):
            return (x[..., 0] * ok[..., None]).float()

    kw = dict(window=2, scale=SCALE, cache_size=1, block=4, output_final_state=True)
    _, state = sparse_hybrid_attention(q, k, v, wq, wk, wf, scorer=ReadOne(), score_x=x, **kw)
    _, recall = sparse_hybrid_attention(q, k, v, wq, wk, wf, **kw)
    assert state.cache_pos.tolist() == [[[2]]] and recall.cache_pos.tolist() == [[[7]]]


def test_the_scorer_learns_to_keep_what_the_recall_error_misses():
    # benchmarks/eviction_probe.py: needles that only the scorer's inputs mark, among 120 past tokens, K = 4.
    path = Path(__file__).parents[2] / "benchmarks" / "eviction_probe.py"
    spec = importlib.util.spec_from_file_location("eviction_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (_, recall, _), (_, fresh, _), (_, trained, _) = module.probe(steps=100, log=lambda _: None)
    assert fresh == recall < 0.1
    assert trained > 0.3
