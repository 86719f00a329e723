"""Tokens/s and peak GPU memory of each stage of a recipe at a real model's shape, through the pipeline itself.

A random-weight model of the shape (see bench_models.SHAPES) is built on the GPU and saved, with a word-level
tokenizer of the same vocabulary size made from the offline corpus, into a temporary folder; `run_pipeline` then
runs a few steps of every stage on `data.dataset=offline` (export and report left out: they are not training).
The recipe runs as it is and again with `transfer.layerwise=true` (its first stage only: the others are the same).

    python benchmarks/bench_pipeline.py --shape llama-3-8b [--profile transfer]

prints, per stage, tokens/s after the warm-up steps and the peak memory, and the projected wall time of a run of
20M + 20M tokens. Extra recipe settings go through `--set key=value` (repeatable).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import SHAPES  # noqa: E402

from linearize.config import load_recipe  # noqa: E402
from linearize.train import pipeline, stages  # noqa: E402

WARMUP_STEPS = 2
PROJECTED_TOKENS = 20_000_000


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids: the offline corpus's words by frequency, then fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from linearize.data.sources import offline_corpus

    split = pre_tokenizers.Whitespace()
    counts = collections.Counter(
        word for doc in offline_corpus() for word, _ in split.pre_tokenize_str(doc) if word.strip()
    )
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word, _ in counts.most_common(vocab_size - len(vocab)):
        vocab.setdefault(word, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_random_model(shape: str, folder: Path, seq_len: int) -> None:
    config = transformers.LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(8192, seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=shape == "smollm2-135m",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    word_tokenizer(config.vocab_size).save_pretrained(folder)


def stage_rates(run_dir: Path) -> dict[str, float]:
    """Tokens/s of each stage over its steps after the warm-up, from metrics.jsonl."""
    rows = collections.defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            rows[record["stage"]].append(record)
    rates = {}
    for name, steps in rows.items():
        first = steps[min(WARMUP_STEPS, len(steps) - 2)] if len(steps) > 1 else None
        last = steps[-1]
        if first is None or last["seconds"] <= first["seconds"]:
            rates[name] = last["tokens"] / max(last["seconds"], 1e-9)
        else:
            rates[name] = (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"])
    return rates


def run_variant(
    model_dir: Path, recipe_name: str, sets: list[str], out: Path, profile: str | None = None
) -> dict[str, dict]:
    """Tokens/s and peak GiB per stage; with `profile` naming a stage, that stage runs under torch.profiler and the
    operations taking most GPU time are printed."""
    peaks: dict[str, float] = {}
    real = stages.run_recipe_stage

    def measured(run, index, stage):
        if not torch.cuda.is_available():  # a dry run of the script on CPU
            peaks[stage.name] = float("nan")
            return real(run, index, stage)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            if stage.name != profile:
                return real(run, index, stage)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                result = real(run, index, stage)
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
            print(f"\nprofile of stage {stage.name} (all its steps, warm-up included):\n{table}", flush=True)
            return result
        finally:
            peaks[stage.name] = torch.cuda.max_memory_allocated() / 2**30

    stages.run_recipe_stage = measured
    export = pipeline._export
    pipeline._export = lambda *args, **kwargs: None  # writing the model files is not training
    try:
        pipeline.run_pipeline(str(model_dir), load_recipe(recipe_name, sets), out)
    finally:
        stages.run_recipe_stage, pipeline._export = real, export
    rates = stage_rates(out / "run")
    return {name: {"tokens_per_s": rates.get(name, float("nan")), "peak_gib": peaks[name]} for name in peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--recipe", default="lolcats")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per stage (the first 2 are warm-up)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch of every stage")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra recipe setting key=value")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", metavar="STAGE", help="run this stage of the default variant under the profiler")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    recipe = load_recipe(args.recipe, args.sets)
    step_tokens = args.seq_len * args.batch_size
    sets = [
        "data.dataset=offline",
        f"data.seq_len={args.seq_len}",
        "report.enabled=false",
        "run.checkpoint_every=1000000",
        f"run.dtype={'bfloat16' if torch.cuda.is_available() else 'float32'}",
    ]
    for stage in recipe.stages:
        sets += [f"{stage.name}.batch_size={args.batch_size}", f"{stage.name}.tokens={args.steps * step_tokens}"]
    sets += args.sets
    first = recipe.stages[0].name
    variants = {
        "default": sets,
        # The later stages do not depend on how the first trained: run the first stage only.
        f"{first}.layerwise=true": [*sets, f"{first}.layerwise=true"]
        + [f"{s.name}.enabled=false" for s in recipe.stages[1:]],
    }

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        started = time.perf_counter()
        model_dir = Path(tmp) / "model"
        save_random_model(args.shape, model_dir, args.seq_len)
        print(f"built and saved a random {args.shape} in {time.perf_counter() - started:.0f} s", flush=True)
        for variant, variant_sets in variants.items():
            t0 = time.perf_counter()
            folder = Path(tmp) / variant.replace("=", "-")
            profile = args.profile if variant == "default" else None
            results[variant] = run_variant(model_dir, args.recipe, variant_sets, folder, profile)
            gc.collect()  # the previous variant's models (peft keeps reference cycles) before the next loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"{variant}: {time.perf_counter() - t0:.0f} s including loading", flush=True)
        print(f"total {time.perf_counter() - started:.0f} s", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.recipe} on {args.shape} (random weights), {device}, seq {args.seq_len}, global batch "
          f"{args.batch_size}, {args.steps} steps per stage ({WARMUP_STEPS} warm-up), extra settings: {args.sets}")  # fmt: skip
    print(f"{'variant':<24} {'stage':<12} {'tokens/s':>10} {'peak GiB':>9}")
    for variant, by_stage in results.items():
        for name, row in by_stage.items():
            print(f"{variant:<24} {name:<12} {row['tokens_per_s']:>10,.0f} {row['peak_gib']:>9.1f}")
    later = {name: row for name, row in results["default"].items() if name != first}
    for variant, by_stage in results.items():
        rows = {first: by_stage[first], **later}
        hours = sum(PROJECTED_TOKENS / row["tokens_per_s"] for row in rows.values()) / 3600
        label = " + ".join(f"{PROJECTED_TOKENS / 1e6:.0f}M {name}" for name in rows)
        print(f"projected wall time of {label} ({variant}): {hours:.2f} h")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
