"""Evaluation: the scorer, agreement with lm-evaluation-harness, perplexity, probes, controls, efficiency,
and the report in all three formats."""

import json
import math

import pytest
import torch
from tiny_models import randomise_new_parameters, save_tiny, tiny_model, tiny_tokenizer

from linearize import AttentionConfig, convert
from linearize.cli import main
from linearize.eval.controls import attention_variant
from linearize.eval.efficiency import measure
from linearize.eval.harness import write_harness_tasks
from linearize.eval.perplexity import perplexity
from linearize.eval.recall import passkey, passkey_prompt
from linearize.eval.report import render_markdown, write_report
from linearize.eval.scorer import Scorer, score_docs
from linearize.eval.tasks import TASKS, Request, select_docs
from linearize.models.export import save_converted


@pytest.fixture(scope="module")
def smol():
    from linearize.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_student():
    model = tiny_model("llama")
    convert(model, AttentionConfig(kind="lolcats", window=4, feature_dim=8))
    randomise_new_parameters(model)
    return model, tiny_tokenizer()


def test_loglikelihood_matches_a_direct_computation(tiny_student):
    model, tok = tiny_student
    scorer = Scorer(model, tok, batch_size=3)
    requests = [
        Request("the city of", " paris"),
        Request("the river", " is the capital of france"),
        Request("water  ", "light"),
        # One prompt, one-token answers (as MMLU): one shared forward, each answer scored on its own.
        Request("the city of", " water"),
        Request("the city of", " light"),
        Request("the city of", " paris"),
    ]
    calls = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)  # fmt: skip
    scored = scorer.loglikelihood(requests)
    hook.remove()
    assert sum(calls) == 3  # six requests; the four one-token answers after "the city of" share one input
    assert scored[0].loglikelihood == scored[5].loglikelihood
    assert len({s.loglikelihood for s in scored[3:]}) == 3
    for req, got in zip(requests, scored, strict=True):
        ctx, cont = scorer.encode_pair(req)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
        expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert got.loglikelihood == pytest.approx(expected, abs=1e-4)
        assert got.n_tokens == len(cont)
    # Trailing context spaces move into the continuation, as in the harness.
    assert scorer.encode_pair(requests[2]) == (tok.encode("water"), tok.encode("water  light")[1:])


def test_task_scores_on_tiny_model(tiny_student):
    model, tok = tiny_student
    for name in ("piqa", "winogrande", "lambada", "mmlu"):
        task = TASKS[name]
        docs = select_docs(task, 2)
        result = score_docs(Scorer(model, tok), task, docs)
        assert result["n"] == len(docs) and 0.0 <= result["acc"] <= 1.0
    assert len(select_docs(TASKS["mmlu"], 1)) == 57


def test_mmlu_prompt_is_five_shot_with_subject_line():
    doc = select_docs(TASKS["mmlu"], 1)[0]
    built = TASKS["mmlu"].build(doc)
    context = built.requests[0].context
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert context.count("\nAnswer:") == 6 and context.endswith("Answer:")
    assert [r.continuation for r in built.requests] == [" A", " B", " C", " D"]


def test_scorer_on_real_smollm2(smol):
    result = score_docs(Scorer(smol.model, smol.tokenizer), TASKS["piqa"], select_docs(TASKS["piqa"], 20))
    # SmolLM2-135M is well above chance on PIQA (about 0.64 on 200 items).
    assert result["n"] == 20 and result["acc_norm"] >= 0.5


def _harness(model_or_path, tok, folder, names, limit, **kwargs):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model_or_path, tokenizer=tok, batch_size=4, device="cpu", **kwargs)
    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder)), limit=limit, log_samples=True
    )


def test_agreement_with_lm_eval(smol, tmp_path):
    names = ["piqa", "winogrande", "lambada"]
    limit = 6
    write_harness_tasks(tmp_path, names, limit=limit)
    out = _harness(smol.model, smol.tokenizer, tmp_path, [f"linearize_{n}" for n in names], limit)
    scorer = Scorer(smol.model, smol.tokenizer, batch_size=4)
    for name in names:
        task = TASKS[name]
        docs = select_docs(task, limit)
        ours = score_docs(scorer, task, docs)
        theirs = out["results"][f"linearize_{name}"]
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in theirs:
                assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-5), (name, metric)
        # Per-request log-likelihoods agree, not only the accuracies.
        samples = sorted(out["samples"][f"linearize_{name}"], key=lambda s: s["doc_id"])
        flat = [r for d in docs for r in task.build(d).requests]
        mine = [s.loglikelihood for s in scorer.loglikelihood(flat)]
        harness = [float(resp[0][0]) for s in samples for resp in s["resps"]]
        assert mine == pytest.approx(harness, abs=2e-4), name


def test_converted_folder_is_an_lm_eval_client(tiny_student, tmp_path):
    model, tok = tiny_student
    folder = tmp_path / "model"
    save_converted(model, tok, folder)
    write_harness_tasks(tmp_path / "tasks", ["arc_easy"], limit=4)
    out = _harness(str(folder), None, tmp_path / "tasks", ["linearize_arc_easy"], 4, trust_remote_code=True)
    ours = score_docs(Scorer(model, tok), TASKS["arc_easy"], select_docs(TASKS["arc_easy"], 4))
    assert out["results"]["linearize_arc_easy"]["acc,none"] == pytest.approx(ours["acc"])
    assert out["results"]["linearize_arc_easy"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_perplexity_and_bits_per_byte(tiny_student):
    model, tok = tiny_student
    text = "the city of paris is the capital of france " * 6
    result = perplexity(model, tok, text, window=16)
    ids = tok.encode(text, add_special_tokens=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids), 16):
        chunk = [tok.eos_token_id] + ids[start : start + 16]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk]), use_cache=False).logits[0].float(), -1)
        nll -= sum(logp[i, chunk[i + 1]].item() for i in range(len(chunk) - 1))
        count += len(chunk) - 1
    assert result["tokens"] == count == len(ids)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    n_bytes = len(tok.decode(ids).encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_passkey_prompt_and_probe(smol):
    tok = smol.tokenizer
    prompt = passkey_prompt(tok, 512, 12345, 0.5)
    n = len(tok.encode(prompt, add_special_tokens=False))
    assert 450 <= n <= 512 and "12345" in prompt and prompt.endswith("The pass key is")
    rows = passkey(smol.model, tok, [128], trials=2)
    assert rows[0]["length"] == 128 and rows[0]["trials"] == 2 and 0 <= rows[0]["accuracy"] <= 1


def test_controls_switch_one_branch_and_restore(tiny_student):
    model, _ = tiny_student
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        outs = {}
        for variant in ("window-only", "linear-only"):
            with attention_variant(model, variant):
                outs[variant] = model(ids, use_cache=False).logits
        again = model(ids, use_cache=False).logits
    assert not torch.allclose(outs["window-only"], base) and not torch.allclose(outs["linear-only"], base)
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    # Inside the window, window-only equals the full model: the linear branch has nothing to add yet.
    torch.testing.assert_close(outs["window-only"][:, :4], base[:, :4])


def test_efficiency_rows(tiny_student):
    model, _ = tiny_student
    rows = measure(model, [16, 64], decode_tokens=3)
    assert [r["length"] for r in rows] == [16, 64]
    assert rows[0]["cache_mb"] == rows[1]["cache_mb"] > 0
    teacher_rows = measure(tiny_model("llama"), [16, 64], decode_tokens=3)
    assert teacher_rows[1]["cache_mb"] > teacher_rows[0]["cache_mb"]


SAVED = {
    "model": "out/smol",
    "teacher": "smollm2-135m",
    "created": "2026-11-25 00:00 UTC",
    "device": "cpu",
    "limit": 10,
    "tasks": [
        {
            "task": "piqa",
            "metric": "acc_norm",
            "n": 10,
            "teacher": 0.7,
            "student": 0.6,
            "chance": 0.5,
            "recovery": 0.6 / 0.7,
            "recovery_above_chance": 0.5,
            "notes": "",
        },
        {
            "task": "arc_easy",
            "metric": "acc_norm",
            "n": 10,
            "teacher": 0.5,
            "student": 0.45,
            "chance": 0.25,
            "recovery": 0.9,
            "recovery_above_chance": 0.8,
            "notes": "validation split",
        },
    ],
    "averages": {
        "zero_shot": {
            "tasks": ["piqa", "arc_easy"],
            "teacher": 0.6,
            "student": 0.525,
            "recovery": 0.875,
            "recovery_above_chance": 0.6,
        }
    },
    "controls": [{"name": "window-only", "tasks": {"piqa": 0.55, "arc_easy": 0.4}, "zero_shot_avg": 0.475}],
    "perplexity": [
        {
            "source": "wiki.txt",
            "tokens": 100,
            "teacher": 20.0,
            "student": 22.0,
            "teacher_bpb": 1.0,
            "student_bpb": 1.05,
            "ratio": 1.1,
        }
    ],
    "recall": [{"probe": "passkey", "length": 512, "teacher": 1.0, "student": 0.4, "trials": 5}],
    "efficiency": {
        "student": [
            {
                "length": 256,
                "batch_size": 1,
                "prefill_tokens_per_s": 900.0,
                "decode_ms_per_token": 20.0,
                "cache_mb": 11.0,
            }
        ],
        "teacher": [
            {
                "length": 256,
                "batch_size": 1,
                "prefill_tokens_per_s": 1000.0,
                "decode_ms_per_token": 25.0,
                "cache_mb": 12.0,
            }
        ],
    },
    "transfer_layer_mse": {"0": 0.01, "1": 0.03, "2": 0.002, "3": 0.05, "10": 0.04},
}


def test_report_renders_json_markdown_and_png(tmp_path, capsys):
    path = write_report(SAVED, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["tasks"] == SAVED["tasks"] and set(data["plots"]) == {
        "tasks.png",
        "efficiency.png",
        "recall.png",
        "transfer.png",
    }
    for name in data["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = path.read_text()
    assert "| piqa | acc_norm | 10 | 0.700 | 0.600 | 85.7% | 50.0% |" in md
    assert "| **average (zero-shot)** | | | 0.600 | 0.525 | 87.5% | 60.0% |" in md
    assert "| window-only | 0.550 | 0.400 | 0.475 |" in md and "![Scores](tasks.png)" in md
    # The worst-transferring layers, by index, ready for the hybrid recipe.
    assert "largest in layers 3 (0.05), 10 (0.04), 1 (0.03)" in md
    assert "--recipe lolcats-hybrid --set 'attention.softmax_layers=[1,3,10]'" in md
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == md == render_markdown(data)
    # Another recipe's run: its own objective named, its own recipe suggested.
    assert "MSE of the per-head attention outputs" in md
    other = render_markdown({**data, "recipe": "radlads", "transfer_objective": "hidden_state"})
    assert "MSE of the attention outputs after o_proj" in other
    assert "--recipe radlads --set 'attention.softmax_layers=[1,3,10]'" in other


def test_eval_cli_writes_report(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "teacher")
    (tmp_path / "t.txt").write_text("the city of paris is the capital of france " * 10)
    out = tmp_path / "rep"
    code = main(
        [
            "eval",
            "--model",
            str(folder),
            "--teacher",
            str(folder),
            "--tasks",
            f"piqa,ppl:{tmp_path / 't.txt'}",
            "--limit",
            "2,piqa=3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"][0]["n"] == 3 and report["task_limits"] == {"piqa": 3}
    for bad, message in (("3,nope=2", "task 'nope' is unknown"), ("many", "--limit takes N"), ("0", "positive")):
        assert main(["eval", "--model", str(folder), "--tasks", "piqa", "--limit", bad]) == 2
        assert message in capsys.readouterr().err
    assert report["tasks"][0]["recovery"] == pytest.approx(1.0) and report["perplexity"][0]["ratio"] == pytest.approx(
        1.0
    )
    assert main(["eval", "--model", str(folder), "--tasks", "nope"]) == 2
    assert "task 'nope' is unknown" in capsys.readouterr().err
    other = save_tiny("llama", tmp_path / "other", seed=3)
    code = main(
        [
            "eval",
            "--model",
            str(folder),
            "--tasks",
            f"piqa,ppl:{tmp_path / 't.txt'},passkey",
            "--passkey-lengths",
            "48",
            "--passkey-trials",
            "2",
            "--limit",
            "3",
            "--compare",
            f"no-transfer={other}",
            "--compare",
            f"same={folder}",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [c["name"] for c in report["controls"]]
    assert names == ["no-transfer", "same"] and set(report["controls"][0]["tasks"]) == {"piqa"}
    other_entry, same = report["controls"]
    # Compared models get the same perplexity and recall measurements as the student: the student itself, compared,
    # reproduces its own figures; another model does not.
    src = str(tmp_path / "t.txt")
    assert same["perplexity"][src] == pytest.approx(report["perplexity"][0]["student"])
    assert other_entry["perplexity"][src] != pytest.approx(report["perplexity"][0]["student"])
    assert same["recall"] == {"passkey@48": report["recall"][0]["student"]}
    md = (out / "report.md").read_text()
    assert "| no-transfer |" in md and "ppl t.txt" in md and "passkey@48" in md
