"""Scaffolds the tests of the recurrent-state kinds share (`test_gated_kinds.py`, `test_gdn.py`,
`test_rwkv7_kind.py`): token ids, a layer's inputs, new parameters moved off their start, decoding against the full
forward, a word corpus."""

from __future__ import annotations

import copy

import torch
from tiny_models import VOCAB, randomise_new_parameters, tiny_model, write_words

from linearize import AttentionConfig, convert
from linearize._compat import CACHE_KWARG, output_cache

# Low ranks keep the tiny model tiny (RADLADS's rule gives at least 32).
RWKV7_RANKS = {"decay_rank": 4, "iclr_rank": 4, "gate_rank": 4}
# Each kind's attention settings in these tests, by a name the tests parametrise over.
CONFIGS = {
    **{kind: dict(kind=kind, window=4, feature_dim=8) for kind in ("gla", "liger", "lizard", "lawcat")},
    "gdn": dict(kind="gdn", chunk_size=4),
    "gdn-conv-rope": dict(kind="gdn", chunk_size=4, options={"conv_kernel": 4, "rope": True}),
    "gdn-no-gate": dict(kind="gdn", chunk_size=4, options={"output_gate": False}),
    # Kept softmax heads in layers 0 and 1 of the tiny llama (its layer 0 is what the single-layer checks use).
    "gdn-heads": dict(
        kind="gdn", chunk_size=4, options={"conv_kernel": 4, "rope": True}, softmax_heads={"0": [1], "1": [0]}
    ),  # fmt: skip
    "rwkv7": dict(kind="rwkv7", chunk_size=4, options=RWKV7_RANKS),
}
# The gated kinds with the same kept heads.
CONFIGS |= {
    f"{kind}-heads": CONFIGS[kind] | {"softmax_heads": {"0": [1], "1": [0]}}
    for kind in ("gla", "liger", "lizard", "lawcat")
}


def attention_config(name, **changes):
    return AttentionConfig(**{**copy.deepcopy(CONFIGS[name]), **changes})


def converted(name, family="llama", **changes):
    """The tiny model of `family` converted with the settings `CONFIGS[name]` (updated with `changes`)."""
    return convert(tiny_model(family), attention_config(name, **changes))


def token_ids(B=2, T=11, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=9):
    """Move every new parameter off its start, so that a term that is zero or one at the start still shows (zero
    projections and an identity conv hide bugs)."""
    randomise_new_parameters(model, seed)


def layer_inputs(T=13, B=2):
    """Hidden states `[B, T, D]` of the tiny llama and their rotary embeddings."""
    teacher = tiny_model("llama")
    hidden = torch.randn(B, T, teacher.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pe = teacher.model.rotary_emb(hidden, torch.arange(T)[None].expand(B, T))
    return hidden, pe


def heads(module, hidden, pe, **kw):
    with torch.no_grad():
        return module.attention_heads(hidden, pe, **kw)


def decoded(model, ids, prefix):
    """Prefill `prefix` tokens, decode the rest one at a time through the cache: (the logits along T, the cache)."""
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            steps.append(out.logits)
    return torch.cat(steps, 1), cache


def decode_equals_full(model, ids, prefix=5):
    """Decoding after a prefill of `prefix` tokens gives the full forward's logits. Returns the cache."""
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    steps, cache = decoded(model, ids, prefix)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    return cache


def generates_greedily(model, ids):
    """Greedy decoding with the cache picks what the full forward over the generated text predicts."""
    with torch.no_grad():
        generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        logits = model(generated, use_cache=False).logits
    assert torch.equal(generated[0, 4:], logits[0, 3:-1].argmax(-1))


def write_corpus(folder):
    """60 paragraphs of 30 random words, a pipeline's `data.dataset`."""
    path = folder / "words.txt"
    write_words(path, 60)
    return path
