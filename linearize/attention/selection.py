"""Where retrieval lives in the teacher: a score per layer and head, and the layers a softmax budget keeps.

A fixed-size linear state loses exact recall, so the layers (or heads) that copy tokens from far back are the ones
worth keeping as softmax. The score measures that directly on the teacher: a block of random tokens is repeated,
and on the second copy a retrieval head puts its attention on the token that followed the current one in the
first copy (the token about to be produced). The score of a head is that attention mass, averaged over the second
copy and over several random blocks; blocks are longer than the sliding window, so what a window already covers
does not count. The attention is recomputed from each layer's captured input with the layer's own projections,
norms and RoPE, so the score needs no eager attention and no `output_attentions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import LinearizeError
from .projection import project_qkv, rope_function


@dataclass
class RetrievalScores:
    """Per-head retrieval scores of a teacher.

    Attributes:
        heads: `[L, H]` mean attention mass on the copied token's successor, in [0, 1].
        block: tokens per repeated block.
        samples: random blocks averaged.
    """

    heads: torch.Tensor
    block: int
    samples: int

    @property
    def layers(self) -> torch.Tensor:
        """`[L]` layer score: the sum of its heads' scores (how much copying the layer does in all)."""
        return self.heads.sum(dim=1)

    def to_dict(self) -> dict:
        return {
            "block": self.block,
            "samples": self.samples,
            "layers": [round(float(x), 5) for x in self.layers],
            "heads": [[round(float(x), 5) for x in row] for row in self.heads],
        }


def _attention_modules(model: nn.Module, attention_cls: type) -> dict[int, nn.Module]:
    found = {m.layer_idx: m for m in model.modules() if type(m) is attention_cls}
    if not found:
        raise LinearizeError(f"no {attention_cls.__name__} module found: score the teacher before converting it")
    return found


def _projection_view(module: nn.Module, config) -> SimpleNamespace:
    """The attributes `project_qkv` reads, taken from an original (unconverted) attention module."""
    view = SimpleNamespace(
        head_dim=module.head_dim,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        rope=rope_function(module),
    )
    for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_norm", "k_norm"):
        if hasattr(module, name):
            setattr(view, name, getattr(module, name))
    return view


def _causal_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None, window: int | None = None
) -> torch.Tensor:
    """Softmax attention probabilities `[B, H, T, T]` from q `[B, T, H, D]`, k `[B, T, Hkv, D]` (GQA), in fp32.

    `window` limits each query to its last `window` keys, as the local layers of Gemma 2/3 do.
    """
    q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    T = q.shape[2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    if window:
        future |= torch.ones_like(future).tril(-window)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def copy_probe(vocab_size: int, block: int, samples: int, seed: int, low: int = 16) -> torch.Tensor:
    """`[samples, 2 * block]` token ids: a random block of ids in `[low, vocab_size)` followed by itself."""
    if vocab_size - low < 2:
        raise LinearizeError(f"the vocabulary ({vocab_size} ids) is too small for the copy probe")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab_size, (samples, block), generator=gen)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def retrieval_scores(
    model: nn.Module,
    attention_cls: type,
    block: int = 512,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 1,
) -> RetrievalScores:
    """Score every layer and head of an unconverted teacher by how much it attends to the token to copy.

    Args:
        model: the teacher (a transformers causal LM whose attention modules are `attention_cls`).
        attention_cls: the family's softmax attention class.
        block: tokens per random block; the probe is two copies, so `2 * block` tokens per sample.
        samples: random blocks averaged (seeded by `seed`).
        batch_size: probes per forward pass.

    Returns:
        `RetrievalScores` with `heads [L, H]`.
    """
    config = model.config
    modules = _attention_modules(model, attention_cls)
    views = {idx: _projection_view(m, config) for idx, m in modules.items()}
    probe = copy_probe(config.vocab_size, block, samples, seed)
    device = next(model.parameters()).device
    # Query at second-copy position block + j holds token j; the token to produce next sits at j + 1.
    queries = torch.arange(block, 2 * block - 1, device=device)
    keys = queries - block + 1
    totals = torch.zeros(len(modules), config.num_attention_heads, dtype=torch.float64)
    captured: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        captured[module.layer_idx] = (hidden, position_embeddings)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()]
    try:
        for start in range(0, samples, batch_size):
            ids = probe[start : start + batch_size].to(device)
            captured.clear()
            model(input_ids=ids, use_cache=False)
            for row, idx in enumerate(sorted(modules)):
                hidden, position_embeddings = captured[idx]
                q, k, _ = project_qkv(views[idx], hidden, position_embeddings)
                module = modules[idx]
                probs = _causal_probs(
                    q,
                    k,
                    module.scaling,
                    getattr(module, "attn_logit_softcapping", None),
                    getattr(module, "sliding_window", None),
                )
                mass = probs[:, :, queries, keys]
                totals[row] += mass.mean(dim=-1).sum(dim=0).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return RetrievalScores(heads=(totals / samples).float(), block=block, samples=samples)


def select_softmax_layers(scores: RetrievalScores, budget: float, candidates: list[int] | None = None) -> list[int]:
    """The layers kept as softmax under `budget`: the highest layer scores, ties to the lower index.

    Args:
        scores: the teacher's retrieval scores.
        budget: fraction of the layers to keep, in [0, 1]; rounded to the nearest whole layer.
        candidates: layer indices allowed (default all), e.g. only the global layers of a local/global model.
    """
    if not 0.0 <= budget <= 1.0:
        raise LinearizeError(f"attention.softmax_budget must be a fraction in [0, 1], got {budget}")
    layer_scores = scores.layers.tolist()
    pool = list(range(len(layer_scores))) if candidates is None else list(candidates)
    count = min(len(pool), math.floor(budget * len(layer_scores) + 0.5))
    ranked = sorted(pool, key=lambda i: (-layer_scores[i], i))
    return sorted(ranked[:count])


def kv_group_scores(scores: RetrievalScores, num_kv_heads: int) -> torch.Tensor:
    """`[L, Hkv]` score of each key/value head: the sum of its query heads' scores.

    A kept key/value head costs its cache whatever its query heads do, and makes all of them exact, so the gain
    bought with that cache is the copying all of them do: the sum. A group with one strong retrieval head still
    ranks high (retrieval heads score near 1, the others near 0), and of two groups with one strong head each the
    one whose siblings copy too wins, which the max would not see.
    """
    L, H = scores.heads.shape
    return scores.heads.view(L, num_kv_heads, H // num_kv_heads).sum(dim=-1)


def select_softmax_heads(
    scores: RetrievalScores, budget: float, num_kv_heads: int, candidates: list[int] | None = None
) -> dict[str, list[int]]:
    """The key/value heads kept as exact softmax under `budget`: the highest group scores, ties to the lower
    (layer, head).

    Args:
        scores: the teacher's retrieval scores.
        budget: fraction of all the model's key/value heads to keep, in [0, 1]; rounded to the nearest head.
        num_kv_heads: key/value heads per layer.
        candidates: layer indices whose heads may be kept (default all), e.g. the layers being converted.

    Returns:
        `{"layer": [kv heads]}` for the layers with kept heads, as `attention.softmax_heads` takes it.
    """
    if not 0.0 <= budget <= 1.0:
        raise LinearizeError(f"attention.softmax_head_budget must be a fraction in [0, 1], got {budget}")
    groups = kv_group_scores(scores, num_kv_heads).tolist()
    layers = range(len(groups)) if candidates is None else candidates
    pool = [(layer, head) for layer in layers for head in range(num_kv_heads)]
    count = min(len(pool), math.floor(budget * len(groups) * num_kv_heads + 0.5))
    ranked = sorted(pool, key=lambda lh: (-groups[lh[0]][lh[1]], lh))
    chosen: dict[str, list[int]] = {}
    for layer, head in sorted(ranked[:count]):
        chosen.setdefault(str(layer), []).append(head)
    return chosen
