"""Exported folders: weights in the teacher's dtype (or the one asked for), and the usual file permissions."""

import os
import stat

import pytest
import torch
from safetensors import safe_open
from tiny_models import randomise_new_parameters, tiny_model, tiny_tokenizer, write_words

from linearize.config import load_recipe
from linearize.errors import LinearizeError
from linearize.fileio import atomic_write_text, usual_mode
from linearize.models.convert import convert
from linearize.models.export import export_dtype, save_converted
from linearize.models.loading import load_model

TINY_SETS = [
    "data.seq_len=32",
    "attention.feature_dim=8",
    "attention.window=8",
    "transfer.tokens=256",
    "finetune.tokens=128",
    "report.enabled=false",
]


def _dtypes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _teacher(folder, dtype):
    tiny_model("llama", dtype=dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_export_dtype_follows_the_checkpoint_unless_asked(tmp_path):
    bf16, fp32 = _teacher(tmp_path / "bf16", torch.bfloat16), _teacher(tmp_path / "fp32", torch.float32)
    assert export_dtype("auto", str(bf16), "float32") == torch.bfloat16
    assert export_dtype("auto", str(fp32), "bfloat16") == torch.float32
    assert export_dtype("float16", str(bf16), "float32") == torch.float16
    with pytest.raises(LinearizeError, match="run.export_dtype"):
        load_recipe("lolcats", ["run.export_dtype=int8"])


def test_bf16_export_reloads_close_to_the_model_in_memory_and_generates_as_it_forwards(tmp_path):
    model = tiny_model("llama")
    recipe = load_recipe("lolcats", ["attention.feature_dim=8", "attention.window=8"])
    convert(model, recipe.attention)
    randomise_new_parameters(model)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    save_converted(model, tiny_tokenizer(), tmp_path / "out", recipe, dtype=torch.bfloat16)
    assert _dtypes(tmp_path / "out") == {"BF16"}
    reloaded = load_model(str(tmp_path / "out"), dtype="float32").model
    with torch.no_grad():
        after = reloaded(ids).logits
        generated = reloaded.generate(ids[:, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        full = reloaded(generated).logits
    # bf16 keeps about 3 significant digits of each weight: the logits move by far less than their spread.
    assert (after - before).abs().max() < 0.05 * before.std()
    assert torch.equal(generated[0, 8:], full[0, 7:-1].argmax(-1))


def test_pipeline_exports_a_bf16_teacher_in_bf16_and_fp32_when_asked(tmp_path):
    from linearize.train.pipeline import run_pipeline

    teacher = _teacher(tmp_path / "teacher", torch.bfloat16)
    corpus = tmp_path / "words.txt"
    write_words(corpus, 60)
    sets = [*TINY_SETS, f"data.dataset={corpus}"]
    run_pipeline(str(teacher), load_recipe("lolcats", sets), tmp_path / "auto")
    assert _dtypes(tmp_path / "auto") == {"BF16"}
    run_pipeline(str(teacher), load_recipe("lolcats", [*sets, "run.export_dtype=float32"]), tmp_path / "fp32")
    assert _dtypes(tmp_path / "fp32") == {"F32"}
    _assert_usual_modes(tmp_path / "auto")


def _assert_usual_modes(folder):
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == usual_mode(name in dirs), (path, oct(mode))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_usual_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~umask
        assert usual_mode(True) == 0o777 & ~umask
    finally:
        os.umask(old)


def test_convert_writes_the_checkpoint_dtype_or_the_one_asked_for_with_the_usual_modes(tmp_path):
    from linearize.cli import main

    teacher = _teacher(tmp_path / "teacher", torch.bfloat16)
    sets = ["--set", "attention.feature_dim=8"]
    assert main(["convert", "--model", str(teacher), "--out", str(tmp_path / "auto"), *sets]) == 0
    assert _dtypes(tmp_path / "auto") == {"BF16"}
    argv = ["convert", "--model", str(teacher), "--out", str(tmp_path / "fp16"), "--export-dtype", "float16", *sets]
    assert main(argv) == 0
    assert _dtypes(tmp_path / "fp16") == {"F16"}
    _assert_usual_modes(tmp_path / "fp16")
