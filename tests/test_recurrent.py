"""Recurrent decoding equals the parallel forward; padding never reaches the state; the cache does not grow."""

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, VOCAB, packed_forwards, randomise_new_parameters, tiny_model

from linearize import AttentionConfig, LinearizeCache, convert
from linearize._compat import CACHE_KWARG, output_cache

WINDOW = 8


def _model(family="llama", kind="lolcats", **kw):
    model = tiny_model(family)
    convert(model, AttentionConfig(kind=kind, window=WINDOW, feature_dim=8, chunk_size=kw.pop("chunk_size", 16), **kw))
    randomise_new_parameters(model)
    return model


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _stepwise_logits(model, ids, first=1):
    """Prefill `first` tokens, then feed one token at a time through the cache."""
    out = model(ids[:, :first], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(first, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("length", [1, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 5], ids=lambda n: f"T{n}")
def test_token_by_token_equals_full_forward(family, length):
    model = _model(family)
    ids = _ids(2, length)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepwise, cache = _stepwise_logits(model, ids)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-4)
    assert isinstance(cache, LinearizeCache) and cache.get_seq_length() == length


@pytest.mark.parametrize("kind", ["hedgehog", "lolcats"])
@pytest.mark.parametrize("split", [3, WINDOW, 13])
def test_chunked_prefill_then_decode(kind, split):
    model = _model(kind=kind, softmax_layers=[2])
    ids = _ids(2, 30, seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepwise, _ = _stepwise_logits(model, ids, first=split)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("kind", ["hedgehog", "lolcats"])
def test_left_padding_does_not_leak(family, kind):
    model = _model(family, kind=kind, softmax_layers=[3])
    lengths = [20, 13, 5]
    T = max(lengths)
    seqs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :], mask[b, T - len(s) :] = s, 1
    # Padding tokens are replaced by garbage to show their values cannot matter.
    ids = torch.where(mask.bool(), ids, torch.randint(3, VOCAB, ids.shape))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        for b, s in enumerate(seqs):
            alone = model(s[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[b, T - len(s) :], alone, rtol=1e-4, atol=1e-4)

    generated = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for b, s in enumerate(seqs):
        alone = model.generate(
            s[None],
            attention_mask=torch.ones(1, len(s), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
        assert generated[b, T:].tolist() == alone[0, len(s) :].tolist()


def test_sampling_and_batched_generate_run():
    model = _model()
    ids = _ids(3, 7)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=10,
        do_sample=True,
        top_k=20,
        temperature=0.8,
        num_return_sequences=2,
        pad_token_id=0,
    )
    assert out.shape == (6, 17)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_cache_size_does_not_grow_with_context(family):
    model = _model(family)
    sizes = {}
    for length in (2 * WINDOW, 20 * WINDOW):
        _, cache = _stepwise_logits(model, _ids(1, length), first=length - 1)
        sizes[length] = cache.nbytes()
    assert sizes[2 * WINDOW] == sizes[20 * WINDOW] > 0


def test_softmax_layers_cache_grows_only_there():
    hybrid = _model(softmax_layers=[1])
    sizes = [_stepwise_logits(hybrid, _ids(1, n), first=n - 1)[1].nbytes() for n in (16, 32)]
    # Layer 1 keeps a key/value cache: 2 tensors x 2 kv heads x 16 dims x fp32 per token.
    assert sizes[1] - sizes[0] == 16 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("kind", ["hedgehog", "lolcats"])
def test_packed_sequences_equal_separate_forwards(family, kind):
    # Sequences packed into one row with transformers' flash-attention kwargs (as DataCollatorWithFlattening
    # makes them): positions restart and the converted layers keep the sequences apart.
    model = _model(family, kind=kind)
    lens = [5, WINDOW + 3, 2 * WINDOW + 1]
    packed, separate, mixed = packed_forwards(model, lens, mixed=True)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)
    # Without the offsets the later sequences see the earlier ones.
    assert not torch.allclose(mixed[:, lens[0] :], separate[:, lens[0] :], atol=1e-3)
