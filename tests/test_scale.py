"""Fitting large models: micro-batches with gradient accumulation and activation checkpointing leave the training
unchanged (same parameters after several steps, same losses), an out-of-memory stage stops with one line naming
the settings to change and the checkpoint kept, and an automatic micro-batch halves on a first-step OOM."""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomise_new_parameters, save_tiny, tiny_model, write_words

from linearize.attention import converted_modules
from linearize.config import load_recipe
from linearize.errors import LinearizeError
from linearize.models.convert import convert
from linearize.models.twin import shallow_twin
from linearize.train.loop import Dist
from linearize.train.registry import OBJECTIVES, TRAINABLES
from linearize.train.stages import Accumulator, Run

BATCH, SEQ, STEPS = 4, 12, 3


def _train(tmp_path, sets: list[str], stage_name: str, micro: int, checkpointing: bool):
    """Parameters and logged losses after STEPS optimiser steps of one stage on a tiny converted Llama."""
    recipe = load_recipe("lolcats", ["attention.feature_dim=8", "attention.window=4", *sets])
    stage = recipe.stage(stage_name)
    teacher = tiny_model("llama", seed=0).requires_grad_(False)
    student = shallow_twin(teacher)
    convert(student, recipe.attention)
    for module in converted_modules(student).values():
        module.float_new_parameters()
    randomise_new_parameters(student)
    # Count the runs of one converted attention: activation checkpointing runs it again in the backward.
    counted = converted_modules(student)[0]
    runs = [0]
    original = counted.attention_heads

    def counting(*args, **kwargs):
        runs[0] += 1
        return original(*args, **kwargs)

    counted.attention_heads = counting
    run = Run(recipe, Dist(), tmp_path, False, teacher, student, None, checkpointing=checkpointing)
    torch.manual_seed(5)  # LoRA's initialisation
    named = TRAINABLES[stage.trains].setup(run, stage)
    objective = OBJECTIVES[stage.objective].build(run, stage)
    accumulate = Accumulator(objective, micro, stage, named, torch.device("cpu"))
    optimizer = torch.optim.AdamW(named.values(), lr=stage.optim.lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses.append(accumulate(torch.randint(3, 128, (BATCH, SEQ), generator=gen)))
        optimizer.step()
    objective.close()
    return {n: p.detach().clone() for n, p in named.items()}, losses, runs[0]


CASES = {
    "transfer-joint": (["transfer.mse_weight=1"], "transfer"),
    "transfer-layerwise": (
        ["transfer.mse_weight=1", "transfer.layerwise=true", "transfer.xent_weight=0.1"],
        "transfer",
    ),
    "finetune-mix-lora": (["finetune.kd_weight=0.5", "finetune.kd_temperature=2", "finetune.lora.r=4"], "finetune"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_and_checkpointing_give_the_big_batch_result(tmp_path, case):
    sets, name = CASES[case]
    params, losses, runs = _train(tmp_path, sets, name, micro=BATCH, checkpointing=False)
    layerwise = "transfer.layerwise=true" in sets
    for micro, checkpointing in ((1, False), (BATCH, True), (2, True)):
        got, got_losses, got_runs = _train(tmp_path, sets, name, micro=micro, checkpointing=checkpointing)
        # One run per micro-batch, two with checkpointing (the layer-wise transfer holds one layer anyway).
        assert got_runs == runs * BATCH // micro * (2 if checkpointing and not layerwise else 1)
        for key in losses[0]:
            assert [m[key] for m in got_losses] == pytest.approx([m[key] for m in losses], rel=1e-5, abs=1e-6), key
        for key, value in params.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{key} {micro} {checkpointing}")
    # The parameters moved: equality above is not that of untouched tensors.
    start, _, _ = _train(tmp_path, [*sets, f"{name}.optim.lr=1e-12"], name, micro=BATCH, checkpointing=False)
    assert any((start[k] - v).abs().max() > 1e-6 for k, v in params.items())


def test_checkpointing_switches_off_after_the_stage(tmp_path):
    sets, name = CASES["finetune-mix-lora"]
    recipe = load_recipe("lolcats", sets)
    teacher = tiny_model("llama").requires_grad_(False)
    student = shallow_twin(teacher)
    convert(student, recipe.attention)
    run = Run(recipe, Dist(), tmp_path, False, teacher, student, None, checkpointing=True)
    TRAINABLES["lora"].setup(run, recipe.stage(name))
    objective = OBJECTIVES["mix"].build(run, recipe.stage(name))
    base = run.model.get_base_model()
    assert base.is_activation_checkpointing
    objective.close()
    assert not base.is_activation_checkpointing
    # The embedding is shared with the teacher: no hook of the stage may stay on it.
    assert not teacher.get_input_embeddings()._forward_hooks


def test_automatic_checkpointing_is_on_only_for_a_stage_that_would_not_fit(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from linearize.train import memory

    recipe = load_recipe("lolcats", ["finetune.batch_size=8"])
    stage = recipe.stage("finetune")
    teacher = tiny_model("llama").requires_grad_(False)
    student = shallow_twin(teacher)
    convert(student, recipe.attention)
    run = Run(recipe, Dist(device=torch.device("cuda")), tmp_path, False, teacher, student, None)
    named = TRAINABLES["lora"].setup(run, stage)
    need = memory.estimate(run, stage, named, 8, 64, True, False).total
    with_it = memory.estimate(run, stage, named, 8, 64, True, True).total
    assert with_it < need
    for total, expected in (
        (need / memory.USABLE_FRACTION * 1.01, False),
        (need / memory.USABLE_FRACTION * 0.99, True),
    ):
        gpu = SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, gpu=gpu: gpu)
        assert memory.use_checkpointing(run, stage, named, 64, True) is expected, total
    # A set micro-batch is what must fit; set values and CPU runs are not estimated.
    run.recipe = load_recipe("lolcats", ["finetune.batch_size=8", "finetune.micro_batch_size=2"])
    assert memory.use_checkpointing(run, run.recipe.stage("finetune"), named, 64, True) is False
    run.recipe = load_recipe("lolcats", ["run.gradient_checkpointing=true"])
    assert memory.use_checkpointing(run, stage, named, 64, True) is True
    run.recipe, run.ctx = recipe, Dist()
    assert memory.use_checkpointing(run, stage, named, 64, True) is False


class _Flaky:
    """An objective that runs out of memory for micro-batches larger than `fits`."""

    def __init__(self, fits: int):
        self.fits, self.sizes = fits, []

    def backward(self, ids, scale=1.0):
        if len(ids) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.sizes.append(len(ids))
        return {"loss": float(ids.float().mean())}


def test_an_automatic_micro_batch_halves_on_a_first_step_oom_and_a_set_one_does_not():
    recipe = load_recipe("lolcats", ["finetune.batch_size=8"])
    stage = recipe.stage("finetune")
    ids = torch.arange(8 * 3).reshape(8, 3)
    flaky = _Flaky(fits=2)
    accumulate = Accumulator(flaky, 8, stage, {}, torch.device("cpu"))
    accumulate.may_shrink = True  # as on CUDA with micro_batch_size=0
    metrics = accumulate(ids)
    assert accumulate.size == 2 and flaky.sizes == [2, 2, 2, 2]
    assert metrics["loss"] == pytest.approx(ids.float().mean().item())
    # After the first step the size is settled: a later OOM is the user's to see.
    flaky.fits = 1
    with pytest.raises(torch.OutOfMemoryError):
        accumulate(ids)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    write_words(path, 60)
    return path


def test_out_of_memory_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, corpus, monkeypatch, caplog):
    from linearize.train import stages
    from linearize.train.pipeline import run_pipeline

    tiny = save_tiny("llama", tmp_path / "tiny")
    real = stages.Accumulator._run
    calls = {"finetune": 0}

    def run_or_fail(self, batch):
        if self.stage.name == "finetune":
            calls["finetune"] += 1
            if calls["finetune"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB")
        return real(self, batch)

    monkeypatch.setattr(stages.Accumulator, "_run", run_or_fail)
    sets = ["data.seq_len=32", "attention.feature_dim=8", "attention.window=8", "transfer.tokens=256",
            "finetune.tokens=512", "run.checkpoint_every=2", "report.enabled=false", f"data.dataset={corpus}"]  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(LinearizeError) as info:
        run_pipeline(str(tiny), load_recipe("lolcats", sets), out)
    message = str(info.value)
    assert "\n" not in message
    for part in ("stage finetune ran out of GPU memory", "finetune.micro_batch_size=2", "gradient_checkpointing=true",
                 "data.seq_len", "--resume"):  # fmt: skip
        assert part in message, message
    state = out / "run" / "checkpoints" / "finetune" / "state.pt"
    assert str(state) in message and state.is_file()
    # The advice works: the run resumes from that checkpoint with the memory settings changed.
    monkeypatch.setattr(stages.Accumulator, "_run", real)
    resumed = load_recipe("lolcats", [*sets, "finetune.micro_batch_size=2", "run.gradient_checkpointing=true"])
    caplog.set_level("INFO", logger="linearize")
    summary = run_pipeline(str(tiny), resumed, out, resume=True).summary
    assert "finetune plan: micro-batch 2 of 4, gradient checkpointing on; estimated peak" in caplog.text
    assert [s["name"] for s in summary["stages"]] == ["transfer", "finetune"] and summary["finished"]
