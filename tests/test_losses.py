"""The sliced vocabulary losses equal the plain cross-entropy and KL, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from linearize.train.losses import LossWeights, final_hidden, output_head, vocab_losses


def _plain(student, teacher, ids, weights):
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    loss = weights.ce * F.cross_entropy(flat, labels.reshape(-1))
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float().reshape(flat.shape)
    t = weights.temperature
    kd = F.kl_div(F.log_softmax(flat / t, -1), F.log_softmax(target / t, -1), log_target=True, reduction="batchmean")
    return loss + weights.kd * kd * t * t


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: final logit soft-capping
@pytest.mark.parametrize("weights", [LossWeights(1, 0), LossWeights(0.5, 0.5, 2.0)], ids=["ce", "mix-T2"])
def test_sliced_losses_equal_the_plain_ones(family, weights):
    student, teacher = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ids = torch.randint(3, student.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = _plain(student, teacher, ids, weights)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    hidden = final_hidden(student, ids)[:, :-1]
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, ids)[:, :-1]
    loss, stats = vocab_losses(
        hidden, ids[:, 1:], output_head(student), weights, teacher_hidden, output_head(teacher), chunk_tokens=7
    )
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(stats) == {k for k, w in (("ce", weights.ce), ("kd", weights.kd)) if w > 0}
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
