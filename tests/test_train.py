"""Training: stage-1 loss falls, layerwise equals joint, the whole pipeline exports a working model, resume after
kill -9 reproduces an uninterrupted run, NaN stops cleanly, and two data-parallel processes match one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny, tiny_model, write_words

from linearize.config import AttentionConfig, OptimConfig, RunConfig, StageConfig, load_recipe
from linearize.errors import LinearizeError
from linearize.models.convert import convert
from linearize.models.twin import shallow_twin
from linearize.train.loop import Dist, run_stage
from linearize.train.transfer import TransferObjective, student_attention_modules

TINY_SETS = [
    "data.seq_len=32",
    "attention.feature_dim=8",
    "attention.window=8",
    "transfer.tokens=2048",
    "finetune.tokens=1024",
    "run.checkpoint_every=4",
    "run.log_every=1",
    "report.limit=2",
    "report.tasks=[piqa,passkey]",
    "report.passkey_lengths=[48]",
    "report.efficiency_lengths=[16]",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    write_words(path, 200)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny")


def _transfer_setup(model, layerwise=False, window=8, layers=None):
    student = shallow_twin(model)
    convert(student, AttentionConfig(kind="lolcats", window=window, feature_dim=8))
    students = student_attention_modules(student)
    if layers is not None:
        students = {i: students[i] for i in layers}
    params = [p for m in students.values() for p in m.new_parameters()]
    for p in params:
        p.requires_grad_(True)
    objective = TransferObjective(model, students, StageConfig(layerwise=layerwise))
    return objective, params


def _train(objective, params, batches, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for ids in batches:
        opt.zero_grad()
        objective.backward(ids)
        opt.step()


def test_transfer_loss_falls_on_tiny_model():
    model = tiny_model("llama").requires_grad_(False)
    objective, params = _transfer_setup(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 128, (4, 48), generator=gen) for _ in range(30)]
    held_out = torch.randint(3, 128, (4, 48), generator=gen)
    before, _ = objective.evaluate(held_out)
    _train(objective, params, batches)
    after, layers = objective.evaluate(held_out)
    assert after < 0.7 * before, (before, after)
    assert set(layers) == {0, 1, 2, 3}


def test_transfer_loss_falls_on_real_smollm2_layers():
    from linearize.config import DataConfig
    from linearize.data import load_documents, pack_documents
    from linearize.models.loading import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model.requires_grad_(False)
    # Short sequences well past the window, so the linear branch carries real weight.
    objective, params = _transfer_setup(model, window=8, layers=[0, 1, 2])
    docs, _ = load_documents(DataConfig(dataset="offline", max_documents=60), loaded.tokenizer)
    seqs = pack_documents(docs, loaded.tokenizer, seq_len=64)
    held_out, train = seqs[:2], seqs[2:]
    before, _ = objective.evaluate(held_out)
    _train(objective, params, [train[i : i + 2] for i in range(0, 16, 2)])
    after, layers = objective.evaluate(held_out)
    assert after < 0.8 * before, (before, after)


def test_layerwise_equals_joint():
    results = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = tiny_model("qwen3").requires_grad_(False)
        objective, params = _transfer_setup(model, layerwise=layerwise)
        gen = torch.Generator().manual_seed(1)
        _train(objective, params, [torch.randint(3, 128, (2, 24), generator=gen) for _ in range(5)])
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layerwise_transfer_keeps_the_kernels_states(monkeypatch):
    # Layerwise, each layer's backward runs right after its forward, so the attention keeps its features and states
    # for it (one layer's memory); the joint mode leaves the choice to LINEARIZE_SAVE_STATES.
    from linearize.attention import hybrid as attention
    from linearize.kernels import hybrid as kernels

    monkeypatch.delenv("LINEARIZE_SAVE_STATES", raising=False)
    seen = []
    op = attention.hybrid_attention

    def recording(*args, **kwargs):
        seen.append(kernels.save_states())
        return op(*args, **kwargs)

    monkeypatch.setattr(attention, "hybrid_attention", recording)
    for layerwise in (False, True):
        model = tiny_model("llama").requires_grad_(False)
        objective, _ = _transfer_setup(model, layerwise=layerwise)
        seen.clear()
        objective.backward(torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0)))
        assert seen == [layerwise] * 4, (layerwise, seen)
    assert not kernels.save_states()


def _cli(args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "linearize.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _sets(corpus, extra=()):
    out = []
    for item in [*TINY_SETS, f"data.dataset={corpus}", *extra]:
        out += ["--set", item]
    return out


def test_full_pipeline_exports_a_model_that_reloads_fresh_and_generates(tmp_path, tiny_dir, corpus):
    out = tmp_path / "run"
    # The quick report leaves the controls out by default; this run asks for them.
    sets = _sets(corpus, ["report.controls=true"])
    proc = _cli(["--model", str(tiny_dir), "--recipe", "lolcats", "--out", str(out), *sets])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"model: {out}" in stdout
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["transfer", "finetune"]
    assert summary["stages"][0]["tokens"] >= 2048 and set(summary["transfer_layer_mse"]) == {"0", "1", "2", "3"}
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["task"] for r in report["tasks"]] == ["piqa"] and report["tasks"][0]["n"] == 2
    assert report["perplexity"][0]["source"].startswith("held-out validation split")
    assert {c["name"] for c in report["controls"]} == {"window-only", "linear-only"}
    assert (out / "report" / "report.md").is_file() and f"report: {out / 'report' / 'report.md'}" in stdout
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == {"transfer", "finetune"}
    code = (
        "import torch; from transformers import AutoModelForCausalLM as A, AutoTokenizer as T;"
        f"d = {str(out)!r}; tok = T.from_pretrained(d, trust_remote_code=True);"
        "m = A.from_pretrained(d, trust_remote_code=True).eval();"
        "assert 'lora' not in ' '.join(n for n, _ in m.named_parameters());"
        "ids = tok('the city of', return_tensors='pt');"
        "print(len(m.generate(**ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip().splitlines()[-1]) == 3 + 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_on_triton_kernels_exports_a_model_that_decodes_as_it_prefills(tmp_path, tiny_dir, corpus):
    # On a GPU the pipeline trains in bf16 through the Triton kernels (forced, so a fallback to the PyTorch path
    # fails the run) and the export reloads in a fresh process on the GPU, where greedy decoding runs the recurrent
    # step: its logits at every new token match a full forward over the same tokens (the chunked kernels).
    out = tmp_path / "run"
    sets = _sets(corpus, ["report.enabled=false", "run.dtype=bfloat16"])
    proc = _cli(["--model", str(tiny_dir), "--recipe", "lolcats", "--out", str(out), *sets],
                env={"LINEARIZE_KERNELS": "triton"})  # fmt: skip
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    transfer = [r["loss"] for r in lines if r["stage"] == "transfer" and "loss" in r]
    assert len(transfer) > 2 and transfer[-1] < transfer[0], transfer
    code = (
        "import torch; from transformers import AutoModelForCausalLM as A, AutoTokenizer as T;"
        f"d = {str(out)!r}; tok = T.from_pretrained(d, trust_remote_code=True);"
        "m = A.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).cuda().eval();"
        "ids = tok('the city of', return_tensors='pt').to('cuda');"
        "g = m.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,"
        " return_dict_in_generate=True);"
        "n = ids['input_ids'].shape[1];"
        "full = m(g.sequences, use_cache=False).logits[0, n - 1 : -1].float();"
        "step = torch.stack(g.logits, 1)[0].float();"
        "print(g.sequences.shape[1], (full - step).abs().max().item() / full.abs().max().item())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LINEARIZE_KERNELS": "triton"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    length, err = run.stdout.strip().splitlines()[-1].split()
    assert int(length) == 3 + 6
    assert float(err) < 1e-3, err


def test_every_bundled_recipe_loads():
    from linearize.config import bundled_recipes

    names = bundled_recipes()
    assert {"lolcats", "hedgehog", "lolcats-hybrid"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        # Every bundled recipe transfers attention, then fine-tunes; some choose softmax layers in between or add a
        # stage after (a longer context).
        names = [s.name for s in recipe.stages if s.name != "select"]
        assert recipe.description and names[:2] == ["transfer", "finetune"]


def test_hybrid_recipe_distils_and_keeps_softmax_layers(tmp_path, tiny_dir, corpus):
    out = tmp_path / "hybrid"
    extra = ["attention.softmax_layers=[1]", "report.enabled=false"]
    proc = _cli(["--model", str(tiny_dir), "--recipe", "lolcats-hybrid", "--out", str(out), *_sets(corpus, extra)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["linearize"]["layers"] == {"0": "lolcats", "1": "softmax", "2": "lolcats", "3": "lolcats"}
    summary = json.loads((out / "run" / "summary.json").read_text())
    # Stage 2 optimises KL(teacher || student): small and non-negative, unlike a next-token cross-entropy.
    finetune = summary["stages"][1]
    assert finetune["name"] == "finetune" and 0 <= finetune["final_loss"] < 2.0
    assert set(summary["transfer_layer_mse"]) == {"0", "2", "3"}


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_dir, corpus):
    # 32 transfer steps and 8 of fine-tuning, killed after the checkpoint of step 5; the weights are compared, so
    # no report.
    sets = _sets(corpus, ["transfer.tokens=4096", "finetune.tokens=1024", "run.checkpoint_every=5",
                          "report.enabled=false"])  # fmt: skip
    ref = tmp_path / "ref"
    proc = _cli(["--model", str(tiny_dir), "--out", str(ref), *sets])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    out = tmp_path / "killed"
    proc = _cli(["--model", str(tiny_dir), "--out", str(out), *sets], start_new_session=True)
    state = out / "run" / "checkpoints" / "transfer" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before its first checkpoint"
    assert not (out / "model.safetensors").exists()

    proc = _cli(["--model", str(tiny_dir), "--out", str(out), "--resume", *sets])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming stage transfer" in stderr
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_a_different_recipe(tmp_path, tiny_dir, corpus):
    out = tmp_path / "o"
    (out / "run").mkdir(parents=True)
    (out / "run" / "recipe.yaml").write_text("name: lolcats\nattention: {window: 16}\n")
    proc = _cli(["--model", str(tiny_dir), "--out", str(out), "--resume", *_sets(corpus)])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "the recipe differs from the run" in stderr.strip().splitlines()[-1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))

    def step_fn(step):
        loss = (w * w).sum() * (float("nan") if step == 7 else 1.0)
        loss.backward()
        return {"loss": loss.item()}

    with pytest.raises(LinearizeError, match=r"step 7: loss is nan; last good checkpoint: .*state.pt \(step 4\)"):
        run_stage(
            "transfer",
            {"w": w},
            OptimConfig(lr=0.1),
            20,
            1,
            step_fn,
            tmp_path,
            RunConfig(checkpoint_every=5),
            Dist(),
            resume=False,
        )
    state = torch.load(tmp_path / "checkpoints" / "transfer" / "state.pt", weights_only=False)
    assert state["step"] == 4 and torch.isfinite(state["params"]["w"]).all()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["transfer.tokens=-5"], "transfer.tokens must be > 0"),
        (["finetune.lora.r=0"], "finetune.lora.r must be > 0"),
        (["finetune.ce_weight=0"], "not both 0"),
        (["transfer.objective=mse"], "transfer.objective 'mse' is unknown; choose one of: attention_output"),
        (["stages.finetune.trains=everything"], "finetune.trains 'everything' is unknown"),
        (["polish.tokens=5"], "unknown recipe key 'polish'; the recipe's stages are: transfer, finetune"),
        (["transfer.optim.schedule=linear"], "schedule must be 'constant' or 'cosine'"),
        (["data.chat_template=maybe"], "data.chat_template must be"),
        (["finetune.lora.alpha=big"], "recipe key 'finetune.lora.alpha': expected int"),
        (["run.bogus=1"], "unknown recipe key 'run.bogus'"),
    ],
)
def test_recipe_validation(sets, message):
    with pytest.raises(LinearizeError, match=message):
        load_recipe("lolcats", sets)


def test_user_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("attention: {kind: hedgehog, feature_dim: 32}\nstages: [{name: only, tokens: 1000}]\n")
    recipe = load_recipe(str(path), ["only.lora.r=4"])
    assert recipe.name == "mine" and recipe.attention.feature_dim == 32 and recipe.stage("only").lora.r == 4
    assert [s.name for s in recipe.stages] == ["only"] and recipe.stage("only").objective == "attention_output"
    path.write_text("attention: {kind: hedgehog, colour: red}\n")
    with pytest.raises(LinearizeError, match="unknown recipe key 'attention.colour'"):
        load_recipe(str(path))


def _torchrun(out, tiny_dir, sets, port):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "linearize.cli",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        *sets,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "run" / "summary.json").read_text())


@pytest.mark.parametrize("stages", ["transfer", "both"])
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path, tiny_dir, corpus, stages):
    # Four steps of each stage; the weights are compared, so no report.
    extra = ["transfer.tokens=512", "finetune.tokens=512", "report.enabled=false"]
    if stages == "transfer":
        extra.append("finetune.enabled=false")
    base = _sets(corpus, extra)
    one = tmp_path / "one"
    proc = _cli(
        [
            "--model",
            str(tiny_dir),
            "--out",
            str(one),
            *base,
            "--set",
            "transfer.batch_size=4",
            "--set",
            "finetune.batch_size=4",
        ]
    )
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    reference = load_file(one / "model.safetensors")
    half = [*base, "--set", "transfer.batch_size=2", "--set", "finetune.batch_size=2"]
    # Plain data parallelism, then FSDP (frozen weights sharded): both must equal the one-process run.
    for name, fsdp, port in (("dp", "false", 29517), ("fsdp", "true", 29527)):
        out = tmp_path / name
        summary = _torchrun(out, tiny_dir, [*half, "--set", f"run.fsdp={fsdp}"], port + (stages == "both"))
        assert summary["world_size"] == 2
        got = load_file(out / "model.safetensors")
        assert got.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        assert Path(out / "config.json").is_file()


def test_attention_weight_cross_entropy_term():
    model = tiny_model("gemma2").requires_grad_(False)
    student = shallow_twin(model)
    convert(student, AttentionConfig(kind="lolcats", window=4, feature_dim=8, convert_sliding_layers=True))
    students = student_attention_modules(student)
    params = [p for m in students.values() for p in m.new_parameters()]
    for p in params:
        p.requires_grad_(True)
    objective = TransferObjective(model, students, StageConfig(mse_weight=0.0, xent_weight=1.0))
    gen = torch.Generator().manual_seed(0)
    held_out = torch.randint(3, 128, (2, 20), generator=gen)
    stats = objective.backward(held_out)
    assert {f"xent/{i}" for i in range(4)} <= set(stats)
    before, _ = objective.evaluate(held_out)
    _train(objective, params, [torch.randint(3, 128, (2, 20), generator=gen) for _ in range(25)], lr=3e-2)
    after, _ = objective.evaluate(held_out)
    assert after < before, (before, after)
