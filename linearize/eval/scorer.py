"""Log-likelihood scoring the way lm-evaluation-harness's `hf` model scores it.

Context and continuation are tokenized as the harness does (trailing context spaces move into the continuation,
the whole string is encoded and split at the context's length), inputs are left-truncated to the model's
length, and each continuation's summed log-probability and greedy flag come from one forward pass. Requests are
batched by length with right padding, which a causal model never sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .tasks import Doc, Request, TaskSpec


@dataclass
class Scored:
    loglikelihood: float
    greedy: bool
    n_tokens: int


class Scorer:
    """Scores requests with `model` and `tokenizer`.

    Args:
        model: a causal LM (teacher or converted).
        tokenizer: its tokenizer.
        batch_size: requests per forward pass.
        max_length: longest input in tokens (default: the model's max positions, at most 4096).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        positions = getattr(model.config, "max_position_embeddings", 2048) or 2048
        self.max_length = max_length or min(positions, 4096)
        self.device = next(model.parameters()).device
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode([bos]) if bos is not None else None

    def encode(self, text: str) -> list[int]:
        # As the harness: the tokenizer's default special tokens, unless the text already starts with BOS.
        if self._prefix_text and text.startswith(self._prefix_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, request: Request) -> tuple[list[int], list[int]]:
        context, continuation = request.context, request.continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Request], progress=None) -> list[Scored]:
        encoded = []
        for req in requests:
            ctx, cont = self.encode_pair(req)
            ids = (ctx + cont)[-(self.max_length + 1) :][:-1]
            encoded.append((ids, cont))
        # Requests with the same input (e.g. MMLU's one-token answer letters after one prompt) share a forward.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, _) in enumerate(encoded):
            groups.setdefault(tuple(ids), []).append(i)
        unique = list(groups)
        order = sorted(range(len(unique)), key=lambda u: -len(unique[u]))
        results: list[Scored | None] = [None] * len(encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(unique[u]) for u in batch)
            inputs = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, u in enumerate(batch):
                inputs[row, : len(unique[u])] = torch.tensor(unique[u])
            # Only the positions that predict continuation tokens need logits: keep the shortest suffix that
            # covers them in every row (the vocabulary projection dominates the cost of short requests).
            first = min(len(unique[u]) - len(encoded[i][1]) for u in batch for i in groups[unique[u]])
            keep = width - first
            logits = self.model(input_ids=inputs.to(self.device), use_cache=False, logits_to_keep=keep).logits
            for row, u in enumerate(batch):
                for i in groups[unique[u]]:
                    ids, cont = encoded[i]
                    n = len(cont)
                    begin = len(ids) - n - first
                    logprobs = torch.log_softmax(logits[row, begin : begin + n].float(), dim=-1).cpu()
                    target = torch.tensor(cont)
                    token_lp = logprobs[torch.arange(n), target]
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results[i] = Scored(float(token_lp.sum()), greedy, n)
                if progress is not None:
                    progress.update(len(groups[unique[u]]))
        return results


def score_docs(scorer: Scorer, task: TaskSpec, docs: list[dict], progress=None) -> dict:
    """Metrics of `task` over `docs` (acc and acc_norm for multiple choice; acc and perplexity for cloze)."""
    built: list[Doc] = [task.build(d) for d in docs]
    flat = [r for doc in built for r in doc.requests]
    scores = scorer.loglikelihood(flat, progress)
    metrics: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    nll, n_words = 0.0, 0
    cursor = 0
    for doc in built:
        doc_scores = scores[cursor : cursor + len(doc.requests)]
        cursor += len(doc.requests)
        lls = np.array([s.loglikelihood for s in doc_scores])
        if task.kind == "cloze":
            metrics["acc"].append(float(doc_scores[0].greedy))
            nll -= doc_scores[0].loglikelihood
            n_words += 1
            continue
        metrics["acc"].append(float(np.argmax(lls) == doc.gold))
        lengths = np.array([float(len(c)) for c in doc.choice_texts])
        metrics["acc_norm"].append(float(np.argmax(lls / lengths) == doc.gold))
    out = {k: float(np.mean(v)) for k, v in metrics.items() if v}
    out["per_doc"] = {k: v for k, v in metrics.items() if v}
    if task.kind == "cloze":
        out["perplexity"] = math.exp(nll / max(n_words, 1))
    out["n"] = len(built)
    return out
