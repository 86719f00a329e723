"""KL-guided layer selection (`objective: kl_restore`): the layer whose restoration to softmax lowers the KL to the
teacher most is the one restored; in a pipeline the choice is recorded, exported, reloaded and re-applied on
resume without measuring again."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny_models import randomise_new_parameters, save_tiny, tiny_model, write_words
from transformers import AutoModelForCausalLM

from linearize.attention import LinearizeCache, converted_modules
from linearize.card import render_model_card
from linearize.config import AttentionConfig, StageConfig, load_recipe
from linearize.errors import LinearizeError
from linearize.models.convert import convert
from linearize.models.twin import shallow_twin
from linearize.train import select
from linearize.train.loop import Dist
from linearize.train.pipeline import run_pipeline
from linearize.train.stages import Run, run_recipe_stage

STAGES = (
    "stages=[{name: transfer, tokens: 512, optim: {lr: 0.01, max_grad_norm: 0.0}},"
    " {name: select, objective: kl_restore, softmax_budget: 0.25, tokens: 128},"
    " {name: finetune, objective: kl, trains: lora, tokens: 256, optim: {lr: 1.0e-3}}]"
)
SETS = ["data.seq_len=32", "attention.feature_dim=8", "attention.window=4", "run.checkpoint_every=4",
        "report.enabled=false"]  # fmt: skip


def test_choice_takes_the_largest_drops_ties_to_the_lower_layer():
    restored = {0: 0.5, 1: 0.2, 2: 0.2, 3: 0.9}
    assert select.choose(4, 0.5, 1.0, restored) == [1, 2]
    assert select.choose(4, 0.25, 1.0, restored) == [1]
    assert select.choose(30, 0.2, 1.0, restored) == [0, 1, 2, 3]  # six wanted, four candidates
    with pytest.raises(LinearizeError, match=r"select.softmax_budget must be a fraction in \(0, 1\]"):
        StageConfig(name="select", objective="kl_restore")


def test_the_layer_converted_worst_is_restored(tmp_path):
    teacher = tiny_model("llama").eval()
    student = shallow_twin(teacher)
    # Layer 2 also keeps a softmax head: restored whole, its kept-head entry goes.
    convert(student, AttentionConfig(kind="lolcats", window=4, feature_dim=8, softmax_heads={"2": [1], "3": [0]}))
    randomise_new_parameters(student)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer 2's linear heads: noise features and no window, the furthest off
        broken = converted_modules(student)[2]
        for fmap in (broken.feature_map_q, broken.feature_map_k):
            fmap.weight.copy_(10 * torch.randn(fmap.weight.shape, generator=gen))
        broken.window_factors.fill_(-20.0)
    recipe = load_recipe("lolcats", ["data.seq_len=16"])
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    run = Run(recipe, Dist(), tmp_path, False, teacher, student, None, data={16: SimpleNamespace(validation=ids)})
    stage = StageConfig(name="select", objective="kl_restore", softmax_budget=0.25, tokens=64, batch_size=2)
    result = run_recipe_stage(run, 1, stage)
    record = result.extra["selection"]
    assert record["layers"] == [2] and sorted(converted_modules(student)) == [0, 1, 3]
    assert min(record["kl_restored"], key=record["kl_restored"].get) == "2"
    assert record["kl_selected"] == pytest.approx(record["kl_restored"]["2"], rel=1e-5)
    assert record["kl_selected"] < record["kl_all_converted"]
    settings = student.config.linearize
    assert settings["layers"]["2"] == "softmax" and settings["attention"]["softmax_layers"] == [2]
    assert settings["attention"]["softmax_heads"] == {"3": [0]}
    assert json.loads((tmp_path / "select.selection.json").read_text()) == record
    # The restored layer is the teacher's attention on the teacher's weights, not a view of the teacher's module.
    restored = student.model.layers[2].self_attn
    assert restored is not teacher.model.layers[2].self_attn
    assert restored.q_proj is teacher.model.layers[2].self_attn.q_proj


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    corpus = root / "words.txt"
    write_words(corpus, 120)
    tiny = save_tiny("llama", root / "tiny")
    recipe = load_recipe("lolcats", [*SETS, f"data.dataset={corpus}", STAGES])
    out = root / "out"
    summary = run_pipeline(str(tiny), recipe, out).summary
    return tiny, recipe, out, summary


def test_pipeline_records_exports_and_reloads_the_choice(selected_run):
    _, _, out, summary = selected_run
    assert [s["name"] for s in summary["stages"]] == ["transfer", "select", "finetune"]
    record = json.loads((out / "run" / "select.selection.json").read_text())
    settings = json.loads((out / "config.json").read_text())["linearize"]
    (chosen,) = record["layers"]
    assert settings["kl_selection"] == record and settings["attention"]["softmax_layers"] == [chosen]
    assert [i for i, kind in settings["layers"].items() if kind == "softmax"] == [str(chosen)]
    card = render_model_card(out)
    assert "stage 2, layer selection: the 0.25 fraction of layers" in card
    assert f"| layers chosen by KL | {chosen}: held-out KL to the teacher {record['kl_all_converted']:.4g}" in card
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sorted(converted_modules(model)) == sorted({0, 1, 2, 3} - {chosen})
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        generated = model.generate(prompt, cache=LinearizeCache(model.config), **greedy)
        full = model(generated.sequences).logits
    torch.testing.assert_close(torch.stack(generated.logits, 1), full[:, 6:-1], atol=1e-5, rtol=1e-4)


def test_resume_reapplies_the_choice_without_measuring(selected_run, tmp_path, monkeypatch):
    tiny, recipe, done, summary = selected_run
    out = tmp_path / "killed"
    shutil.copytree(done, out)
    shutil.rmtree(out / "run" / "checkpoints" / "finetune")
    for path in [out / "run" / "summary.json", *out.glob("*.safetensors"), out / "config.json"]:
        path.unlink()

    def measure(*args):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(select, "kl_restore_scores", measure)
    resumed = run_pipeline(str(tiny), recipe, out, resume=True).summary
    assert resumed["stages"][1]["extra"] == summary["stages"][1]["extra"]
    assert resumed["stages"][2]["final_loss"] == summary["stages"][2]["final_loss"]
    config = json.loads((out / "config.json").read_text())["linearize"]
    assert config["layers"] == json.loads((done / "config.json").read_text())["linearize"]["layers"]
