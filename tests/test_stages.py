"""Recipes as lists of stages: the bundled two-stage recipes give the losses of their stages written out by hand,
first-wave recipes still load, per-layer errors survive a resume, a finished run is left alone, and stages with
other objectives, trainable sets and sequence lengths run."""

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny, tiny_model, write_words

from linearize.attention import converted_modules
from linearize.config import StageConfig, load_recipe
from linearize.errors import LinearizeError
from linearize.train.pipeline import run_pipeline

SETS = [
    "data.seq_len=32",
    "attention.feature_dim=8",
    "attention.window=8",
    "transfer.tokens=1024",
    "finetune.tokens=512",
    "run.checkpoint_every=4",
    "report.enabled=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    write_words(path, 120)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny")


def _recipe(name, corpus, extra=()):
    return load_recipe(name, [*SETS, f"data.dataset={corpus}", *extra])


@pytest.fixture(scope="module")
def lolcats_run(tmp_path_factory, tiny_dir, corpus):
    out = tmp_path_factory.mktemp("runs") / "lolcats"
    result = run_pipeline(str(tiny_dir), _recipe("lolcats", corpus), out)
    return out, result.summary


def _logged_losses(out):
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        stage: [r["loss"] for r in lines if r["stage"] == stage and "loss" in r] for stage in ("transfer", "finetune")
    }


def _written_out_losses(tiny_dir, recipe, run_dir):
    """Both stages of the first wave, written out with torch, peft and hooks: no stage, objective or trainable
    registry, no training loop of the package."""
    from peft import LoraConfig, get_peft_model

    from linearize.data import BatchPlan, PackedData
    from linearize.models.convert import convert
    from linearize.models.loading import load_model
    from linearize.models.twin import shallow_twin

    torch.manual_seed(recipe.run.seed)
    random.seed(recipe.run.seed)
    teacher = load_model(str(tiny_dir), dtype="float32").model.eval().requires_grad_(False)
    student = shallow_twin(teacher)
    convert(student, recipe.attention)
    modules = converted_modules(student)
    data = PackedData(**torch.load(run_dir / "data.pt", weights_only=False))
    transfer, finetune = recipe.stages
    seq_len = data.train.shape[1]

    # Stage 1: the feature maps and window factors learn each layer's per-head attention output.
    params = [p for m in modules.values() for n, p in m.named_parameters() if n.startswith(("feature_map", "window"))]
    for p in params:
        p.requires_grad_(True)
    captured, handles = {}, []
    for idx in modules:
        attn = teacher.model.layers[idx].self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, idx=idx: captured.__setitem__(idx, [kw["hidden_states"], kw["position_embeddings"]]),
            with_kwargs=True,
        ))  # fmt: skip
        handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, idx=idx: captured[idx].append(a[0])))
    opt = torch.optim.AdamW(params, lr=transfer.optim.lr, betas=tuple(transfer.optim.betas), weight_decay=0.0)
    plan = BatchPlan(len(data.train), transfer.batch_size, recipe.run.seed)
    losses = {"transfer": [], "finetune": []}
    for step in range(plan.steps_for(transfer.tokens, seq_len)):
        opt.zero_grad()
        with torch.no_grad():
            teacher.model(input_ids=data.train[plan.indices(step)], use_cache=False)
        total = sum(
            transfer.mse_weight * F.mse_loss(modules[i].attention_heads(h, pe), target) for i, (h, pe, target) in
            captured.items()
        )  # fmt: skip
        total.backward()
        opt.step()
        losses["transfer"].append(total.item())
    for p in params:
        p.requires_grad_(False)
    for handle in handles:
        handle.remove()

    # Stage 2: LoRA on the projections, next-token cross-entropy and/or KL to the teacher, clipped at norm 1.
    lora = finetune.lora
    model = get_peft_model(
        student,
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                   bias="none", task_type="CAUSAL_LM"),
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=finetune.optim.lr, betas=tuple(finetune.optim.betas), weight_decay=0.0)
    plan = BatchPlan(len(data.train), finetune.batch_size, recipe.run.seed + 1)
    model.train()
    for step in range(plan.steps_for(finetune.tokens, seq_len)):
        opt.zero_grad()
        ids = data.train[plan.indices(step)]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float().flatten(0, 1)
        loss = 0.0
        if finetune.ce_weight > 0:
            loss = loss + finetune.ce_weight * F.cross_entropy(logits, ids[:, 1:].reshape(-1))
        if finetune.kd_weight > 0:
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float().flatten(0, 1)
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
            loss = loss + finetune.kd_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, finetune.optim.max_grad_norm)
        opt.step()
        losses["finetune"].append(loss.item())
    return losses


def _printed(values):
    return [f"{v:.4g}" for v in values]


@pytest.mark.parametrize("name", ["lolcats", "lolcats-hybrid"])
def test_bundled_two_stage_recipes_give_the_losses_of_the_stages_written_out(name, tmp_path, tiny_dir, corpus,
                                                                              lolcats_run):  # fmt: skip
    if name == "lolcats":
        out = lolcats_run[0]
    else:
        out = tmp_path / name
        run_pipeline(str(tiny_dir), _recipe(name, corpus, ["attention.softmax_layers=[1]"]), out)
    recipe = load_recipe(out / "run" / "recipe.yaml")
    logged, expected = _logged_losses(out), _written_out_losses(tiny_dir, recipe, out / "run")
    assert recipe.stage("finetune").kd_weight == (name == "lolcats-hybrid")
    assert len(logged["transfer"]) == 8 and len(logged["finetune"]) == 4
    for stage in ("transfer", "finetune"):
        assert _printed(logged[stage]) == _printed(expected[stage]), stage


def test_first_wave_recipes_become_stages(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "attention: {kind: lolcats}\n"
        "transfer: {tokens: 1000, optim: {lr: 0.02}}\n"
        "finetune: {tokens: 500, kd_weight: 0.5, train_attention: true}\n"
    )
    recipe = load_recipe(str(old), ["transfer.batch_size=2"])
    transfer, finetune = recipe.stages
    assert (transfer.name, transfer.objective, transfer.trains) == ("transfer", "attention_output", "attention")
    assert (transfer.tokens, transfer.batch_size, transfer.mse_weight, transfer.optim.lr) == (1000, 2, 1000.0, 0.02)
    assert (finetune.objective, finetune.trains, finetune.ce_weight, finetune.kd_weight) == (
        "mix",
        "lora+attention",
        1.0,
        0.5,
    )
    # A first-wave section left out keeps the defaults it had then.
    bare = tmp_path / "bare.yaml"
    bare.write_text("transfer: {enabled: false}\n")
    transfer, finetune = load_recipe(str(bare)).stages
    assert not transfer.enabled and transfer.optim.max_grad_norm == 0.0 and finetune.kd_weight == 0.0
    both = tmp_path / "both.yaml"
    both.write_text("transfer: {tokens: 10}\nstages: []\n")
    with pytest.raises(LinearizeError, match="both 'stages' and a 'transfer:' section"):
        load_recipe(str(both))


def test_stages_are_set_by_name_or_through_stages():
    a = load_recipe("lolcats", ["transfer.tokens=2e6", "finetune.optim.lr=3e-4"])
    b = load_recipe("lolcats", ["stages.transfer.tokens=2e6", "stages.1.optim.lr=3e-4"])
    assert a == b and a.stage("transfer").tokens == 2_000_000 and a.stage("finetune").optim.lr == 3e-4
    with pytest.raises(LinearizeError, match="unknown recipe key 'transfer.colour'"):
        load_recipe("lolcats", ["transfer.colour=red"])
    with pytest.raises(LinearizeError, match="stage name 'run' must be unique"):
        load_recipe("lolcats", ["stages.finetune.name=run"])


def test_per_layer_errors_survive_a_resume_and_a_finished_run_is_left_alone(tmp_path, tiny_dir, corpus, lolcats_run):
    done, summary = lolcats_run
    assert set(summary["transfer_layer_mse"]) == {"0", "1", "2", "3"} and summary["finished"]
    # A run killed during stage 2: stage 1's final checkpoint is there, nothing after it.
    out = tmp_path / "killed"
    shutil.copytree(done, out)
    shutil.rmtree(out / "run" / "checkpoints" / "finetune")
    for path in [out / "run" / "summary.json", *out.glob("*.safetensors"), out / "config.json"]:
        path.unlink()
    recipe = _recipe("lolcats", corpus)
    resumed = run_pipeline(str(tiny_dir), recipe, out, resume=True).summary
    assert resumed["transfer_layer_mse"] == summary["transfer_layer_mse"]
    assert resumed["stages"][0]["seconds"] == summary["stages"][0]["seconds"] and resumed["finished"]
    assert resumed["stages"][1]["final_loss"] == summary["stages"][1]["final_loss"]

    model_file = out / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    again = run_pipeline(str(tiny_dir), recipe, out, resume=True).summary
    assert again == json.loads((out / "run" / "summary.json").read_text()) == resumed
    assert model_file.stat().st_mtime_ns == stamp


def test_stages_of_other_objectives_trainables_and_lengths(tmp_path, tiny_dir, corpus):
    stages = (
        "stages=[{name: transfer, tokens: 512, optim: {lr: 0.01, max_grad_norm: 0.0}},"
        " {name: align, objective: hidden_state, tokens: 512, seq_len: 48, optim: {lr: 0.01}},"
        " {name: polish, objective: kl, trains: all, tokens: 256, optim: {lr: 1.0e-3}}]"
    )
    out = tmp_path / "three"
    summary = run_pipeline(str(tiny_dir), _recipe("lolcats", corpus, [stages]), out).summary
    assert [s["name"] for s in summary["stages"]] == ["transfer", "align", "polish"]
    assert summary["stages"][1]["tokens"] == summary["stages"][1]["steps"] * 4 * 48
    assert (out / "run" / "data-48.pt").is_file()
    assert summary["stages"][2]["first_loss"] < 5.0  # a KL to the teacher, not a cross-entropy near ln(128)
    # Training every weight changed the MLPs, which the other stages never touch.
    from safetensors.torch import load_file

    from linearize.models.loading import load_model

    exported, original = load_file(out / "model.safetensors"), load_model(str(tiny_dir), dtype="float32").model
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(exported[key], original.state_dict()[key])


def test_hidden_state_objective_matches_the_outputs_after_o_proj():
    from linearize.config import AttentionConfig
    from linearize.models.convert import convert
    from linearize.models.twin import shallow_twin
    from linearize.train.transfer import TransferObjective

    teacher = tiny_model("qwen3").requires_grad_(False)
    student = shallow_twin(teacher)
    convert(student, AttentionConfig(kind="lolcats", window=4, feature_dim=8))
    modules = converted_modules(student)
    objective = TransferObjective(teacher, modules, StageConfig(mse_weight=2.0), target="output")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    captured = {}
    for idx, layer in enumerate(teacher.model.layers):
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, out, idx=idx: captured.__setitem__(idx, (kw["hidden_states"], kw["position_embeddings"],
                                                                      out[0])),
            with_kwargs=True,
        )  # fmt: skip
    total, per_layer = objective.evaluate(ids)
    expected = {
        i: F.mse_loss(modules[i].o_proj(modules[i].attention_heads(h, pe)), out).item()
        for i, (h, pe, out) in captured.items()
    }
    assert set(per_layer) == set(expected) == {0, 1, 2, 3}
    for i in expected:
        assert per_layer[i] == pytest.approx(expected[i], rel=1e-5)
    assert total == pytest.approx(2.0 * sum(expected.values()), rel=1e-5)
