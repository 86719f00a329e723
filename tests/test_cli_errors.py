"""Bad input gives one clear line, a non-zero exit code and no output folder."""

import subprocess
import sys

import pytest
import transformers
from tiny_models import save_tiny

from linearize.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    return save_tiny("llama", tmp_path / "tiny-llama")


@pytest.fixture
def gpt2_folder(tmp_path):
    folder = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no-such-alias"], "is not a known alias"),
        (["--model", "./missing/folder"], "is not a known alias, an existing folder"),
        (["--model", "missing.gguf"], "GGUF file missing.gguf does not exist"),
        (["--recipe", "nope"], "recipe 'nope' is neither a bundled recipe"),
        (["--set", "attention.windw=3"], "unknown recipe key 'attention.windw'"),
        (["--set", "attention.window=abc"], "recipe key 'attention.window': expected int"),
        (["--set", "attention.kind=performer"], "attention.kind 'performer' is unknown"),
        (["--set", "nonsense"], "must look like key.path=value"),
    ],
    ids=["alias", "folder", "gguf", "recipe", "set-key", "set-value", "kind", "set-syntax"],
)
def test_convert_errors_are_one_line(tmp_path, tiny_folder, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["convert", "--model", str(tiny_folder), "--out", str(out)] + extra
    code, err = _run(argv, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("linearize: error:") and message in err[0], err
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("LINEARIZE_KERNELS", "cuda", "LINEARIZE_KERNELS='cuda' is not one of ['auto', 'torch', 'triton']"),
        ("LINEARIZE_SAVE_STATES", "maybe", "LINEARIZE_SAVE_STATES='maybe' is not 0 or 1"),
    ],
)
def test_bad_kernel_setting_stops_before_any_work(tmp_path, tiny_folder, capsys, monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    out = tmp_path / "out"
    code, err = _run(["--model", str(tiny_folder), "--recipe", "lolcats", "--out", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_unsupported_architecture_names_supported_ones(tmp_path, gpt2_folder, capsys):
    out = tmp_path / "out"
    code, err = _run(["convert", "--model", str(gpt2_folder), "--out", str(out)], capsys)
    assert code == 2 and "architecture 'gpt2' is not supported" in err[-1] and "llama" in err[-1]
    assert not out.exists()


def test_non_empty_out_folder_is_refused(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["convert", "--model", str(tiny_folder), "--out", str(out)], capsys)
    assert code == 2 and "already exists and is not empty" in err[-1]
    assert (out / "keep.txt").read_text() == "mine"


def test_offline_hub_id_fails_fast_with_one_line(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "linearize.cli",
            "convert",
            "--model",
            "some-org/some-model",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("linearize: error: 'some-org/some-model' is not in the local")


def test_convert_and_generate_from_local_folder(tmp_path, tiny_folder, capsys):
    out = tmp_path / "conv"
    code = main(
        [
            "convert",
            "--model",
            str(tiny_folder),
            "--out",
            str(out),
            "--set",
            "attention.feature_dim=8",
            "--set",
            "attention.softmax_layers=[1]",
        ]
    )
    assert code == 0
    assert {"config.json", "model.safetensors", "modeling_linearize.py", "linearize_recipe.yaml"} <= {
        p.name for p in out.iterdir()
    }
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "linearized_llama"
    assert config.linearize["attention"]["feature_dim"] == 8 and config.linearize["layers"]["1"] == "softmax"
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the capital of france is", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the capital of france is") and len(text.split()) > 5


def test_models_and_recipes_listings(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and "meta-llama/Meta-Llama-3-8B" in listing and "phi3" in listing
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "lolcats" in listing and "hedgehog" in listing
