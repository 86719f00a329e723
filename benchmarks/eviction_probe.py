"""Does learned eviction learn what to keep? A synthetic needle probe of the sparse-cache op (a minute on a CPU).

    python benchmarks/eviction_probe.py [--steps 200] [--seed 0]

Each sequence has T tokens with random unit keys and values. A few of them, the needles, all in the first half,
carry a marker: their keys share one direction. The last W queries each ask for one needle (the query is a
multiple of its key), long after it left the window. Only the scorer trains (`attention.eviction.TokenScorer`,
reading keys and values as in a converted layer; feature maps fixed at random), on the squared error between the
outputs at the asking positions and the needles' values, with the straight-through gradient of the op. Printed:
the share of needles in the kept set after the last token, and the probe's error, for the recall-error choice
(LoLA), the learned choice before and after training, and chance (K among the tokens older than the window).
"""

from __future__ import annotations

import argparse

import torch

from linearize.attention.eviction import TokenScorer
from linearize.kernels.hybrid.sparse import sparse_hybrid_attention

T, D, F, W, C, K, NEEDLES, BATCH = 128, 16, 8, 8, 8, 4, 4, 32


def make_batch(gen: torch.Generator, marker: torch.Tensor):
    keys = torch.nn.functional.normalize(torch.randn(BATCH, T, 1, D, generator=gen), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(BATCH, T, 1, D, generator=gen), dim=-1)
    where = torch.stack([torch.randperm(T // 2, generator=gen)[:NEEDLES] for _ in range(BATCH)])
    rows = torch.arange(BATCH)[:, None]
    keys[rows, where, 0] = torch.nn.functional.normalize(keys[rows, where, 0] + 2.0 * marker, dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(BATCH, T, 1, D, generator=gen), dim=-1)
    asked = where[:, torch.arange(W) % NEEDLES]
    queries[:, T - W :, 0] = 8.0 * keys[rows, asked, 0]
    return queries, keys, values, where, values[rows, asked, 0]


def run(batch, weights, scorer, learned: bool):
    q, k, v, where, want = batch
    kw = dict(window=W, scale=1.0, cache_size=K, block=C, output_final_state=True)
    if learned:
        kw.update(scorer=scorer, score_x=torch.cat([k, v], dim=-1))
    out, state = sparse_hybrid_attention(q, k, v, *weights, **kw)
    loss = (out[:, T - W :, 0] - want).pow(2).sum(-1).mean()
    kept = (state.cache_pos[:, 0, :, None] == where[:, None, :]).any(1).float().mean()
    return loss, kept


def probe(steps: int, seed: int = 0, log=print) -> list[tuple[str, float, float]]:
    """`(choice, needles kept, probe error)` for the recall error, the scorer before and after `steps` steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    marker = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    weights = (
        0.5 * torch.randn(1, D, F, generator=gen),
        0.5 * torch.randn(1, D, F, generator=gen),
        torch.tensor([4.0]),
    )
    scorer = TokenScorer(1, 2 * D)
    test = make_batch(torch.Generator().manual_seed(seed + 1), marker)
    rows = []
    with torch.no_grad():
        rows.append(("recall error (LoLA)", *run(test, weights, scorer, learned=False)))
        rows.append(("learned, before training", *run(test, weights, scorer, learned=True)))
    optim = torch.optim.Adam(scorer.parameters(), lr=3e-3)
    for step in range(steps):
        loss, kept = run(make_batch(gen, marker), weights, scorer, learned=True)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}: loss {loss.item():.4f}, needles kept {kept.item():.2f}")
    with torch.no_grad():
        rows.append((f"learned, after {steps} steps", *run(test, weights, scorer, learned=True)))
    return [(name, kept.item(), loss.item()) for name, loss, kept in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = probe(args.steps, args.seed)
    print(f"\n| choice (K={K} of {T - W} past tokens, {NEEDLES} needles) | needles kept | probe error |")
    print("|---|---|---|")
    for name, kept, loss in rows:
        print(f"| {name} | {kept:.2f} | {loss:.3f} |")
    print(f"| chance | {K / (T - W):.2f} | |")


if __name__ == "__main__":
    main()
