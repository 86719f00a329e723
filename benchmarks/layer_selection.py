"""Which layers to keep as softmax: KL-guided selection against the copy probe and even spacing, on one student.

    python benchmarks/layer_selection.py [--model smollm2-135m] [--recipe gdn-hybrid-kl] [--transfer-tokens 24576]
        [--budget 0.2] [--sequences 16] [--seq-len 256]

Converts every layer of the teacher with the recipe's attention, runs the recipe's first stage (attention
transfer) at the given budget, then measures the held-out KL(teacher || student) with no layer restored, with
each layer alone restored to softmax, and with the budget's worth of layers restored as each criterion chooses
them: the largest single-layer KL drops (`kl_restore`), the teacher's copy probe (`attention.softmax_budget`),
evenly spaced layers, and the last layers. Prints a table; a CPU run at the defaults takes a few minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from linearize.attention import converted_modules
from linearize.attention.selection import retrieval_scores, select_softmax_layers
from linearize.config import load_recipe
from linearize.models.convert import convert
from linearize.models.families import family_for
from linearize.models.loading import load_model
from linearize.models.twin import shallow_twin
from linearize.train import select
from linearize.train.loop import Dist
from linearize.train.pipeline import _load_data
from linearize.train.stages import Run, run_recipe_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="gdn-hybrid-kl")
    parser.add_argument("--transfer-tokens", type=int, default=24576)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    ctx = Dist.current()
    recipe = load_recipe(args.recipe, [f"data.seq_len={args.seq_len}", f"transfer.tokens={args.transfer_tokens}"])
    loaded = load_model(args.model, dtype="float32")
    teacher = loaded.model.to(ctx.device).eval()
    teacher.requires_grad_(False)
    probe = recipe.attention.probe
    scores = retrieval_scores(teacher, family_for(teacher.config).attention_cls, probe.block, probe.samples, probe.seed)
    student = shallow_twin(teacher)
    convert(student, recipe.attention)
    for module in converted_modules(student).values():
        module.float_new_parameters()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        data = _load_data(recipe, loaded.tokenizer, run_dir, ctx)
        run = Run(recipe, ctx, run_dir, False, teacher, student, None, data={args.seq_len: data})
        started = time.perf_counter()
        run_recipe_stage(run, 0, recipe.stages[0])
        transfer_s = time.perf_counter() - started
        sequences = data.validation[: args.sequences]
        started = time.perf_counter()
        baseline, restored = select.kl_restore_scores(run, sequences, args.batch_size)
        score_s = time.perf_counter() - started
        layers = teacher.config.num_hidden_layers
        count = select.choose(layers, args.budget, baseline, restored)
        n = len(count)
        choices = {
            "KL-guided (kl_restore)": count,
            "copy probe (softmax_budget)": select_softmax_layers(scores, args.budget),
            "evenly spaced": sorted({round((i + 0.5) * layers / n - 0.5) for i in range(n)}),
            "last layers": list(range(layers - n, layers)),
        }
        rows = [(name, chosen, select.kl_with_restored(run, chosen, sequences, args.batch_size))
                for name, chosen in choices.items()]  # fmt: skip
    print(f"\n{args.model}, {args.recipe}: transfer {args.transfer_tokens:,} tokens ({transfer_s:.0f} s); held-out KL on "
          f"{len(sequences)} x {sequences.shape[1]} tokens; scoring {layers} layers took {score_s:.0f} s")  # fmt: skip
    print(f"KL with every layer converted: {baseline:.4f}")
    print("single layer restored, best five: " + ", ".join(
        f"{k}: {v:.4f}" for k, v in sorted(restored.items(), key=lambda kv: kv[1])[:5]))  # fmt: skip
    print(f"\n| {n} of {layers} layers restored, chosen by | layers | held-out KL |")
    print("|---|---|---|")
    for name, chosen, kl in rows:
        print(f"| {name} | {', '.join(map(str, chosen))} | {kl:.4f} |")


if __name__ == "__main__":
    main()
