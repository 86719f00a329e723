"""Retrieval scores of the teacher's layers and heads, and the softmax-budget layer choice."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from linearize.attention.selection import RetrievalScores, copy_probe, retrieval_scores, select_softmax_layers
from linearize.errors import LinearizeError
from linearize.models.families import family_for


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_scores_match_the_teachers_own_attention_weights(family):
    """The recomputed attention equals transformers' eager weights; the score reads the successor of the copy."""
    model = tiny_model(family)
    model.config._attn_implementation = "eager"
    block, samples = 24, 3
    scores = retrieval_scores(model, family_for(model.config).attention_cls, block=block, samples=samples, seed=5)
    probe = copy_probe(model.config.vocab_size, block, samples, seed=5)
    with torch.no_grad():
        attentions = model(input_ids=probe, output_attentions=True, use_cache=False).attentions
    expected = torch.zeros_like(scores.heads)
    for layer, probs in enumerate(attentions):
        for j in range(block - 1):
            expected[layer] += probs[:, :, block + j, j + 1].float().mean(dim=0) / (block - 1)
    torch.testing.assert_close(scores.heads, expected, atol=1e-5, rtol=1e-4)
    assert scores.heads.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)


def test_probe_is_a_repeated_block_and_seeded():
    probe = copy_probe(100, 7, 2, seed=3)
    assert probe.shape == (2, 14)
    assert torch.equal(probe[:, :7], probe[:, 7:])
    assert torch.equal(probe, copy_probe(100, 7, 2, seed=3))
    assert not torch.equal(probe, copy_probe(100, 7, 2, seed=4))


def test_budget_keeps_the_highest_layers_with_ties_to_the_lower_index():
    heads = torch.tensor([[0.1, 0.0], [0.5, 0.2], [0.0, 0.0], [0.3, 0.6], [0.8, 0.0]])
    scores = RetrievalScores(heads=heads, block=8, samples=1)
    assert select_softmax_layers(scores, 0.4) == [3, 4]
    assert select_softmax_layers(scores, 0.0) == []
    assert select_softmax_layers(scores, 1.0) == [0, 1, 2, 3, 4]
    assert select_softmax_layers(scores, 0.4, candidates=[0, 1, 2]) == [0, 1]
    tied = RetrievalScores(heads=torch.zeros(4, 1), block=8, samples=1)
    assert select_softmax_layers(tied, 0.5) == [0, 1]
    with pytest.raises(LinearizeError, match="softmax_budget"):
        select_softmax_layers(scores, 1.5)
