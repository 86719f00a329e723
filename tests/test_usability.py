"""What a new user meets first: help texts with defaults, a quick start, `generate --chat` output, and the
Python API (`linearize.train`, `linearize.evaluate`) that the CLI's commands call."""

import argparse
import json
import subprocess
import sys

import pytest
from tiny_models import save_tiny, write_words

import linearize
from linearize.cli import build_parser, main

TINY_SETS = {
    "data.seq_len": 32,
    "attention.feature_dim": 8,
    "attention.window": 8,
    "transfer.tokens": 256,
    "finetune.tokens": 128,
    "report.enabled": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    write_words(path, 60)
    return path


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parser, commands = _commands()
    for name, command in [("linearize", parser), *commands.items()]:
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    for name in ("train", "eval", "generate", "corpus", "convert"):
        text = commands[name].format_help()
        assert "(default:" in text, name
    flat = {name: " ".join(commands[name].format_help().split()) for name in ("generate", "train", "eval")}
    assert "(default: 40)" in flat["generate"] and "(default: lolcats)" in flat["train"]
    assert "(default: hellaswag,piqa" in flat["eval"] and "(default: 512,1024,2048)" in flat["eval"]


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["train", "--help"], ["generate", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    code = (
        "import sys\nfrom linearize.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nprint('HEAVY', heavy)"
    )
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "HEAVY []" in run.stdout and "usage: linearize" in run.stdout


def test_import_linearize_is_light_and_still_registers_the_converted_classes(tmp_path, tiny):
    out = tmp_path / "conv"
    assert main(["convert", "--model", str(tiny), "--out", str(out), "--set", "attention.feature_dim=8"]) == 0
    code = (
        "import sys\nimport linearize\nassert 'torch' not in sys.modules, 'import linearize loaded torch'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, type(m).__module__)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # The class registered by `import linearize`, not the folder's remote code (which needs trust_remote_code).
    assert run.stdout.split()[-1].startswith("linearize.models.hf")


def test_generate_chat_prints_the_prompt_and_the_answer_not_the_template(tmp_path, tiny, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = (
        "<s> system: you are a helpful model </s>{% for m in messages %} {{ m['role'] }}: {{ m['content'] }} </s>"
        "{% endfor %}{% if add_generation_prompt %} assistant:{% endif %}"
    )
    folder = tmp_path / "chat"
    save_tiny("llama", folder)
    tok.save_pretrained(folder)
    prompt = "the capital of france is"
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--chat", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[0] == prompt and len(lines) == 2
    assert "system" not in lines[1] and "helpful" not in lines[1] and "user" not in lines[1]
    assert 1 <= len(lines[1].split()) <= 4


def test_help_of_the_package_shows_train_and_evaluate():
    text = subprocess.run(
        [sys.executable, "-c", "import linearize, pydoc; print(pydoc.render_doc(linearize, renderer=pydoc.plaintext))"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "train(model" in text and "evaluate(model" in text and "Args:" in text


def test_cli_train_and_eval_are_thin_wrappers_over_the_api(monkeypatch, capsys, tmp_path):
    import linearize.api

    calls = {}

    def fake_train(*args, **kwargs):
        calls["train"] = (args, kwargs)
        return type("R", (), {"summary": None})()

    def fake_evaluate(*args, **kwargs):
        calls["evaluate"] = (args, kwargs)
        path = tmp_path / "report.md"
        path.write_text("# report")
        return linearize.api.Evaluation(report={}, path=path)

    monkeypatch.setattr(linearize.api, "train", fake_train)
    monkeypatch.setattr(linearize.api, "evaluate", fake_evaluate)
    assert main(["--model", "m", "--out", "o", "--set", "transfer.tokens=2e6", "--resume"]) == 0
    assert calls["train"] == (("m", "lolcats", "o", ["transfer.tokens=2e6"]), {"resume": True, "overwrite": False})
    assert main(["eval", "--model", "m", "--teacher", "t", "--limit", "5", "--passkey-lengths", "64"]) == 0
    args, kwargs = calls["evaluate"]
    assert args == ("m",) and kwargs["teacher"] == "t" and kwargs["limit"] == "5" and kwargs["passkey_lengths"] == [64]


def test_train_then_evaluate_from_python(tmp_path, tiny, corpus):
    overrides = {**TINY_SETS, "data.dataset": str(corpus)}
    result = linearize.train(str(tiny), recipe="lolcats", out=tmp_path / "smol", overrides=overrides)
    assert [s["name"] for s in result.summary["stages"]] == ["transfer", "finetune"]
    assert (tmp_path / "smol" / "model.safetensors").is_file()
    again = linearize.train(str(tiny), out=tmp_path / "smol", overrides=overrides, resume=True)
    assert again.summary == result.summary
    evaluation = linearize.evaluate(str(tmp_path / "smol"), teacher=str(tiny), tasks=["piqa"], limit=2, controls=False)
    assert evaluation.path == tmp_path / "smol" / "report" / "report.md" and evaluation.path.is_file()
    row = evaluation.report["tasks"][0]
    assert row["task"] == "piqa" and row["n"] == 2
    assert json.loads((evaluation.path.parent / "report.json").read_text())["tasks"][0]["n"] == 2
    with pytest.raises(linearize.LinearizeError, match="unknown options"):
        linearize.evaluate(str(tmp_path / "smol"), tasks="piqa", batchsize=4)
