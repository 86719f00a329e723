"""The bad-input battery: every command given bad models, recipes, data, output folders, full or read-only disks,
interrupts and damaged run files answers with one line (`linearize: error: ...`), exit code 2 (130 for Ctrl-C),
and leaves the folders it was given exactly as they were (or absent).

Each case runs `linearize.cli.main` in-process in a fresh working folder (`work/`, with `home/` as the home
folder); the whole tree is hashed before and after, so any file written, changed or deleted fails the case.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny_models import save_tiny, write_words

from linearize.cli import main

TINY_SETS = [
    "data.seq_len=16",
    "attention.feature_dim=4",
    "attention.window=4",
    "transfer.tokens=128",
    "finetune.tokens=64",
    "run.checkpoint_every=2",
    "report.enabled=false",
]


def sets(*items: str) -> list[str]:
    out = []
    for item in [*TINY_SETS, "data.dataset={words}", *items]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shared read-only inputs: tiny models, a converted model, a finished run, a corpus, a text file."""
    root = tmp_path_factory.mktemp("assets")
    a = SimpleNamespace(root=root)
    a.tiny = save_tiny("llama", root / "tiny")
    a.tiny2 = save_tiny("llama", root / "tiny2", seed=1)
    a.notok = root / "notok"
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(a.notok)
    a.gpt2 = root / "gpt2"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(a.gpt2)
    a.words = root / "words.txt"
    write_words(a.words, 40)
    fill = {"words": a.words}
    a.conv = root / "conv"
    assert main(["convert", "--model", str(a.tiny), "--out", str(a.conv), "--set", "attention.feature_dim=4"]) == 0
    a.done = root / "done"
    argv = ["--model", str(a.tiny), "--out", str(a.done), *[x.format(**fill) for x in sets()]]
    assert main(argv) == 0
    a.corpus = root / "corpus"
    argv = ["corpus", "--model", str(a.tiny), "--out", str(a.corpus), "--tokens", "16", "--prompts", str(a.words),
            "--max-new-tokens", "4", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    return a


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its contents (run logs excepted: a resume appends to them)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.name == "log.txt":
            continue
        if path.is_symlink():
            tree[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return tree


# --- set-ups: each gets the case's namespace (paths) and monkeypatch ---------------------------------------------


def copy_of(name, to="out"):
    def setup(w, mp):
        shutil.copytree(getattr(w, name), w.work / to, symlinks=True)

    return setup


_SUFFIXES = {"json", "jsonl", "txt", "yaml", "csv", "bin", "gguf", "pt", "py"}


def files(**contents):
    """Files under the working folder; a keyword names the path with `__` for "/" (and "." before a suffix)."""

    def setup(w, mp):
        for key, data in contents.items():
            parts = key.split("__")
            if len(parts) > 1 and parts[-1] in _SUFFIXES:
                parts[-2:] = [f"{parts[-2]}.{parts[-1]}"]
            path = w.work.joinpath(*parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def both(*setups):
    def setup(w, mp):
        for s in setups:
            s(w, mp)

    return setup


def interrupted_run(w, mp):
    """A copy of the finished run cut back to "stage 2 not started": what `kill -9` leaves."""
    out = w.work / "out"
    shutil.copytree(w.done, out)
    for path in out.iterdir():
        if path.name not in ("run", ".linearize-output"):
            path.unlink()
    shutil.rmtree(out / "run" / "checkpoints" / "finetune")
    (out / "run" / "summary.json").unlink()


def truncate(rel):
    def setup(w, mp):
        path = w.work / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return setup


class _Payload:
    """Unpickling this runs a shell command that creates a file: what a crafted checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def pickle_bomb(rel):
    def setup(w, mp):
        torch.save({"step": 0, "params": _Payload(w.root / "pwned")}, w.work / rel)

    return setup


def raise_in(target, exc):
    def setup(w, mp):
        def boom(*args, **kwargs):
            if isinstance(exc, OSError) and len(args) > 2 and isinstance(args[2], Path):
                (args[2] / "model.safetensors").write_bytes(b"partial")
            raise exc

        mp.setattr(target, boom)

    return setup


def env(**values):
    def setup(w, mp):
        for key, value in values.items():
            mp.setenv(key, value)

    return setup


def link_out(w, mp):
    shutil.copytree(w.conv, w.work / "out")
    (w.work / "secret.txt").write_text("not yours")
    (w.work / "out" / "extra.safetensors").symlink_to(w.work / "secret.txt")


def parquet_garbage(w, mp):
    (w.work / "data.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8)


def binary(n=4096, seed=0):
    return random.Random(seed).randbytes(n)


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EROFS = OSError(errno.EROFS, "Read-only file system")

# Refusals that config.json settles must come before any weight is read.
NO_WEIGHTS = raise_in("linearize.models.loading.AutoModelForCausalLM.from_pretrained", AssertionError("loaded weights"))

TRAIN = ["--model", "{tiny}", "--out", "out"]
CONVERT = ["convert", "--model", "{tiny}", "--out", "out"]
RESUME = [*TRAIN, "--resume"]

C = pytest.param
CASES = [
    # model
    C([*CONVERT, "--model", "no-such-alias"], "is not a known alias", None, id="model-unknown-alias"),
    C(
        [*CONVERT, "--model", "./missing/folder"],
        "is not a known alias, an existing folder",
        None,
        id="model-missing-folder",
    ),
    C([*CONVERT, "--model", "missing.gguf"], "GGUF file missing.gguf does not exist", None, id="model-missing-gguf"),
    C(
        [*CONVERT, "--model", "some-org/some-model"],
        "is not in the local Hugging Face cache",
        None,
        id="model-offline-hub-id",
    ),
    C([*CONVERT, "--model", "m"], "has no config.json", files(m__weights="x"), id="model-folder-without-config"),
    C([*CONVERT, "--model", "m"], "is not valid JSON", files(m__config__json="{oops"), id="model-config-not-json"),
    C(
        [*CONVERT, "--model", "m"],
        "could not load",
        both(copy_of("tiny", "m"), truncate("m/model.safetensors")),
        id="model-truncated-safetensors",
    ),
    C([*CONVERT, "--model", "g.gguf"], "could not read GGUF file", files(g__gguf=binary()), id="model-gguf-garbage"),
    C([*CONVERT, "--model", "{gpt2}"], "architecture 'gpt2' is not supported", NO_WEIGHTS, id="model-unsupported-arch"),
    C(
        [*TRAIN, "--model", "{gpt2}", *sets()],
        "architecture 'gpt2' is not supported",
        NO_WEIGHTS,
        id="train-unsupported-arch",
    ),
    C([*CONVERT, "--model", "{conv}"], "is already converted", NO_WEIGHTS, id="model-already-converted"),
    C([*TRAIN, "--model", "{notok}", *sets()], "has no tokenizer", None, id="train-model-without-tokenizer"),
    C(
        ["generate", "--model", "{notok}", "--prompt", "hi"],
        "has no tokenizer files",
        None,
        id="generate-model-without-tokenizer",
    ),
    # recipe
    C([*CONVERT, "--recipe", "nope"], "recipe 'nope' is neither a bundled recipe", None, id="recipe-unknown"),
    C([*CONVERT, "--recipe", "r.yaml"], "is not valid YAML", files(r__yaml="a: [1\n"), id="recipe-bad-yaml"),
    C([*CONVERT, "--recipe", "r.yaml"], "must hold a mapping", files(r__yaml="- 1\n"), id="recipe-not-a-mapping"),
    C([*CONVERT, "--set", "attention.windw=3"], "unknown recipe key 'attention.windw'", None, id="set-unknown-key"),
    C(
        [*CONVERT, "--set", "attention.window=abc"],
        "recipe key 'attention.window': expected int",
        None,
        id="set-bad-type",
    ),
    C(
        [*CONVERT, "--set", "attention.kind=performer"],
        "attention.kind 'performer' is unknown",
        None,
        id="set-unknown-kind",
    ),
    C([*CONVERT, "--set", "nonsense"], "must look like key.path=value", None, id="set-syntax"),
    C(
        [*CONVERT, "--set", "attention.softmax_layers=[9]"],
        "the model has layers 0..3",
        None,
        id="set-softmax-layer-out-of-range",
    ),
    C([*TRAIN, *sets("transfer.tokens=-5")], "transfer.tokens must be > 0", None, id="set-negative-budget"),
    C([*TRAIN, *sets("finetune.lora.r=0")], "finetune.lora.r must be > 0", None, id="set-lora-rank-zero"),
    C(
        [*TRAIN, *sets("data.seq_len=4096")],
        "beyond the model's position limit",
        NO_WEIGHTS,
        id="seq-len-above-positions",
    ),
    C([*TRAIN, *sets("transfer.tokens=1e12")], "passes over the", None, id="absurd-token-budget"),
    C([*TRAIN, *sets("run.dtype=float64")], "run.dtype must be", None, id="set-bad-dtype"),
    # data
    C(
        [*TRAIN, *sets("data.dataset=missing.txt")],
        "data.dataset missing.txt does not exist",
        None,
        id="data-missing-file",
    ),
    C([*TRAIN, *sets("data.dataset=d.csv")], "must be one of", files(d__csv="a,b\n"), id="data-wrong-suffix"),
    C([*TRAIN, *sets("data.dataset=d")], "holds no", files(d__x__bin=b"\x00"), id="data-folder-without-text"),
    C([*TRAIN, *sets("data.dataset=d.txt")], "not UTF-8 text", files(d__txt=binary()), id="data-binary-txt"),
    C([*TRAIN, *sets("data.dataset=d.jsonl")], "is not UTF-8", files(d__jsonl=binary()), id="data-binary-jsonl"),
    C(
        [*TRAIN, *sets("data.dataset=data.parquet")],
        "not a readable parquet file",
        parquet_garbage,
        id="data-binary-parquet",
    ),
    C(
        [*TRAIN, *sets("data.dataset=d.jsonl")],
        "not valid JSON",
        files(d__jsonl='{"text": "a"}\n{oops\n'),
        id="data-jsonl-bad-line",
    ),
    C(
        [*TRAIN, *sets("data.dataset=d.jsonl")],
        "is not a JSON object",
        files(d__jsonl="[1, 2]\n"),
        id="data-jsonl-not-objects",
    ),
    C(
        [*TRAIN, *sets("data.dataset=d.jsonl")],
        "rows have no 'text' field",
        files(d__jsonl='{"body": "a"}\n'),
        id="data-jsonl-no-text-field",
    ),
    C(
        [*TRAIN, *sets("data.dataset=d.jsonl")],
        "holds int values",
        files(d__jsonl='{"text": 5}\n'),
        id="data-jsonl-text-not-string",
    ),
    C([*TRAIN, *sets("data.dataset=d.txt")], "no text found", files(d__txt=""), id="data-empty-file"),
    C(
        [*TRAIN, *sets("data.dataset=d.txt")],
        "fewer than one sequence",
        files(d__txt="the city"),
        id="data-shorter-than-one-sequence",
    ),
    # output folder
    C([*CONVERT, "--out", "", "--overwrite"], "--out is empty", files(keep="mine"), id="out-empty-string"),
    C([*TRAIN, "--out", "", *sets()], "--out is empty", None, id="train-out-empty-string"),
    C([*CONVERT, "--out", ".", "--overwrite"], "is the current folder", files(keep="mine"), id="out-dot"),
    C([*TRAIN, "--out", ".", "--overwrite", *sets()], "is the current folder", files(keep="mine"), id="train-out-dot"),
    C([*CONVERT, "--out", "..", "--overwrite"], "is the current folder or holds it", None, id="out-parent"),
    C([*CONVERT, "--out", "/", "--overwrite"], "is the current folder or holds it", None, id="out-root"),
    C([*CONVERT, "--out", "{home}", "--overwrite"], "is the home folder", None, id="out-home"),
    C(
        [*CONVERT, "--model", "m", "--out", "m", "--overwrite"],
        "is, holds or sits inside the input",
        copy_of("tiny", "m"),
        id="out-is-the-model",
    ),
    C(
        [*TRAIN, "--model", "m", "--out", "m", "--overwrite", *sets()],
        "is, holds or sits inside the input",
        copy_of("tiny", "m"),
        id="train-out-is-the-teacher",
    ),
    C(
        [*CONVERT, "--model", "m", "--out", "m/sub", "--overwrite"],
        "is, holds or sits inside the input",
        both(copy_of("tiny", "m"), copy_of("conv", "m/sub")),
        id="out-inside-the-model",
    ),
    C(
        [*CONVERT, "--model", "p/m", "--out", "p", "--overwrite"],
        "is, holds or sits inside the input",
        copy_of("tiny", "p/m"),
        id="out-holds-the-model",
    ),
    C(
        [*TRAIN, "--out", "d", "--overwrite", *sets("data.dataset=d/t.txt")],
        "is, holds or sits inside the input",
        both(copy_of("conv", "d"), files(d__t__txt="the city " * 200)),
        id="train-out-holds-the-data",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "does not look like a linearize model output",
        files(out__notes__txt="mine"),
        id="out-foreign-folder",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "does not look like a linearize model output",
        files(out__config__json="{}"),
        id="out-foreign-model-folder",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "holds files linearize did not write (notes.txt)",
        both(copy_of("conv"), files(out__notes__txt="mine")),
        id="out-ours-plus-user-file",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "holds files linearize did not write (.git)",
        both(copy_of("conv"), files(**{"out/.git/HEAD": "ref"})),
        id="out-ours-inside-a-git-repo",
    ),
    C([*CONVERT, "--overwrite"], "holds a linearize corpus output", copy_of("corpus"), id="out-other-kind"),
    C(CONVERT, "already exists and is not empty", files(out__keep__txt="mine"), id="out-not-empty"),
    C(CONVERT, "is a file, not a folder", files(out="mine"), id="out-is-a-file"),
    C([*CONVERT, "--out", "f/sub"], "which is a file", files(f="mine"), id="out-under-a-file"),
    C([*TRAIN, *sets()], "is a file, not a folder", files(out="mine"), id="train-out-is-a-file"),
    C([*TRAIN, *sets()], "pass --resume to continue its run", interrupted_run, id="train-out-holds-a-run"),
    # disk and interruption
    C(
        [*CONVERT, "--overwrite"],
        "No space left on device",
        both(copy_of("conv"), raise_in("linearize.models.export.save_converted", ENOSPC)),
        id="disk-full-at-convert-export",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "read-only",
        both(copy_of("conv"), raise_in("linearize.outdir.tempfile.mkdtemp", EROFS)),
        id="read-only-disk-at-convert",
    ),
    C(
        [*TRAIN, "--overwrite", *sets()],
        "No space left on device",
        both(copy_of("done"), raise_in("linearize.models.export.save_converted", ENOSPC)),
        id="disk-full-at-train-export",
    ),
    C(
        [*CONVERT, "--overwrite"],
        "linearize: interrupted",
        both(copy_of("conv"), raise_in("linearize.models.export.save_converted", KeyboardInterrupt())),
        id="ctrl-c-during-convert-export",
    ),
    C(
        [*TRAIN, *sets()],
        "linearize: interrupted",
        raise_in("linearize.train.transfer.TransferObjective.backward", KeyboardInterrupt()),
        id="ctrl-c-at-first-train-step",
    ),
    C(
        [*TRAIN, *sets()],
        "Read-only file system",
        raise_in("linearize.outdir.write_marker", EROFS),
        id="read-only-disk-at-train-start",
    ),
    C(
        [*TRAIN, *sets()],
        "No space left on device",
        raise_in("linearize.train.checkpoint.atomic_write", ENOSPC),
        id="disk-full-while-training",
    ),
    # resume and damaged run files
    C([*RESUME, *sets()], "holds nothing to resume", None, id="resume-without-run"),
    C([*RESUME, "--overwrite", *sets()], "pass only one", interrupted_run, id="resume-and-overwrite"),
    C([*RESUME, "--model", "{tiny2}", *sets()], "was made with --model", interrupted_run, id="resume-other-model"),
    C([*RESUME, *sets("attention.window=8")], "the recipe differs", interrupted_run, id="resume-other-recipe"),
    C(
        [*RESUME, *sets("transfer.optim.lr=1e-4")],
        "recipe differs from the run in out (transfer.optim.lr)",
        interrupted_run,
        id="resume-finished-stage-lr",
    ),
    C(
        [*RESUME, *sets()],
        "is damaged",
        both(interrupted_run, files(out__run__recipe__yaml="a: [1\n")),
        id="resume-damaged-recipe",
    ),
    C(
        [*RESUME, *sets()],
        "cannot be read safely",
        both(interrupted_run, truncate("out/run/data.pt")),
        id="resume-truncated-data",
    ),
    C(
        [*RESUME, *sets()],
        "cannot be read safely",
        both(interrupted_run, truncate("out/run/checkpoints/transfer/final.pt")),
        id="resume-truncated-final-checkpoint",
    ),
    C(
        [*RESUME, *sets()],
        "cannot be read safely",
        both(interrupted_run, files(out__run__checkpoints__finetune__state__pt=b"\x80\x02garbage")),
        id="resume-garbage-state",
    ),
    C(
        [*RESUME, *sets()],
        "cannot be read safely",
        both(interrupted_run, pickle_bomb("out/run/data.pt")),
        id="resume-pickle-payload-in-data",
    ),
    C(
        [*RESUME, *sets()],
        "cannot be read safely",
        both(interrupted_run, pickle_bomb("out/run/checkpoints/transfer/final.pt")),
        id="resume-pickle-payload-in-checkpoint",
    ),
    # generate
    C(
        ["generate", "--model", "{conv}", "--prompt", "hi", "--max-new-tokens", "-1"],
        "--max-new-tokens must be",
        None,
        id="generate-negative-tokens",
    ),
    C(
        ["generate", "--model", "{conv}", "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens must be",
        None,
        id="generate-zero-tokens",
    ),
    C(["generate", "--model", "{conv}", "--prompt", "  "], "--prompt is empty", None, id="generate-empty-prompt"),
    C(
        ["generate", "--model", "{conv}", "--prompt", "hi", "--chat"],
        "has no chat template",
        None,
        id="generate-chat-without-template",
    ),
    C(
        ["generate", "--model", "{conv}", "--prompt", "hi", "--sample", "--temperature", "0"],
        "--temperature > 0",
        None,
        id="generate-zero-temperature",
    ),
    # corpus
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--tokens", "lots"],
        "takes a number",
        None,
        id="corpus-bad-tokens",
    ),
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--tokens", "0"],
        "must be positive",
        None,
        id="corpus-zero-tokens",
    ),
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--heldout", "1"],
        "--heldout must be in",
        None,
        id="corpus-heldout-one",
    ),
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--overwrite"],
        "does not look like a linearize corpus",
        files(c__train__jsonl='{"text": "mine"}\n'),
        id="corpus-foreign-folder",
    ),
    C(["corpus", "--model", "{tiny}", "--out", "c"], "is a file", files(c="mine"), id="corpus-out-is-a-file"),
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--resume"],
        "holds nothing to resume",
        None,
        id="corpus-resume-without-corpus",
    ),
    C(
        ["corpus", "--model", "{tiny}", "--out", "c", "--resume", "--tokens", "99", "--prompts", "{words}"],
        "other settings",
        copy_of("corpus", "c"),
        id="corpus-resume-other-settings",
    ),
    # eval, report, lm-eval-tasks
    C(
        ["eval", "--model", "{conv}", "--batch-size", "0"],
        "--batch-size must be at least 1",
        None,
        id="eval-batch-size-zero",
    ),
    C(
        ["eval", "--model", "{conv}", "--passkey-lengths", "0"],
        "--passkey-lengths takes positive",
        None,
        id="eval-passkey-length-zero",
    ),
    C(
        ["eval", "--model", "{conv}", "--passkey-lengths", "1k"],
        "takes comma-separated integers",
        None,
        id="eval-passkey-length-text",
    ),
    C(["eval", "--model", "{conv}", "--tasks", "nope"], "task 'nope' is unknown", None, id="eval-unknown-task"),
    C(["eval", "--model", "{conv}", "--limit", "abc"], "--limit takes", None, id="eval-bad-limit"),
    C(["eval", "--model", "{conv}", "--out", "r"], "is a file", files(r="mine"), id="eval-out-is-a-file"),
    C(
        ["eval", "--model", "{conv}", "--out", "r"],
        "does not look like a linearize report",
        files(r__a__txt="x"),
        id="eval-out-foreign-folder",
    ),
    C(
        ["eval", "--model", "{conv}", "--tasks", "piqa", "--limit", "1", "--compare", "x"],
        "--compare takes NAME=MODEL",
        None,
        id="eval-bad-compare",
    ),
    C(["report", "r"], "does not exist", files(r__x="y"), id="report-without-json"),
    C(["report", "r"], "is not valid JSON", files(r__report__json="{oops"), id="report-damaged-json"),
    C(
        ["lm-eval-tasks", "--out", "t"],
        "already exists and is not empty",
        files(t__utils__py="# mine"),
        id="lm-eval-tasks-user-folder",
    ),
    C(
        ["lm-eval-tasks", "--out", "t", "--overwrite"],
        "does not look like a linearize lm-eval-tasks",
        files(t__utils__py="# mine"),
        id="lm-eval-tasks-user-utils-py",
    ),
    C(["lm-eval-tasks", "--out", "t"], "is a file", files(t="mine"), id="lm-eval-tasks-out-is-a-file"),
    C(
        ["lm-eval-tasks", "--out", "t", "--tasks", "nope"],
        "task 'nope' is unknown",
        None,
        id="lm-eval-tasks-unknown-task",
    ),
    C(
        ["lm-eval-tasks", "--out", "t", "--limit", "0"],
        "--limit must be at least 1",
        None,
        id="lm-eval-tasks-zero-limit",
    ),
    # push
    C(["push", "out", "--repo-id", "a/b", "--dry-run"], "outside", link_out, id="push-link-out-of-folder"),
    C(["push", "nowhere", "--repo-id", "a/b", "--dry-run"], "is not a folder", None, id="push-missing-folder"),
    C(
        ["push", "{conv}", "--repo-id", "bad//id", "--dry-run"],
        "is not a valid Hub repo id",
        None,
        id="push-bad-repo-id",
    ),
    C(
        ["push", "out", "--repo-id", "a/b", "--dry-run"],
        "has no model.safetensors",
        both(copy_of("conv"), lambda w, mp: (w.work / "out" / "model.safetensors").unlink()),
        id="push-no-weights",
    ),
    # environment
    C([*TRAIN, *sets()], "LINEARIZE_KERNELS='cuda' is not one of", env(LINEARIZE_KERNELS="cuda"), id="env-bad-kernels"),
    C(
        [*TRAIN, *sets()],
        "LINEARIZE_SAVE_STATES='maybe' is not 0 or 1",
        env(LINEARIZE_SAVE_STATES="maybe"),
        id="env-bad-save-states",
    ),
]


# Where a run already has checkpoints, a late failure keeps the new run (resumable) beside the old output, which
# must stay as it was.
WATCH_OUT_ONLY = {"disk-full-at-train-export"}


@pytest.mark.parametrize("argv, message, setup", CASES)
def test_bad_input(assets, tmp_path, monkeypatch, capsys, request, argv, message, setup):
    w = SimpleNamespace(**{**vars(assets), "root": tmp_path, "work": tmp_path / "work", "home": tmp_path / "home"})
    w.work.mkdir()
    w.home.mkdir()
    (w.home / ".bashrc").write_text("mine")
    monkeypatch.chdir(w.work)
    monkeypatch.setenv("HOME", str(w.home))
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    if setup is not None:
        setup(w, monkeypatch)
    fill = {k: v for k, v in vars(w).items() if isinstance(v, Path)}
    argv = [a.format(**fill) for a in argv]
    watch = w.work / "out" if request.node.callspec.id in WATCH_OUT_ONLY else w.work
    watched = {"work": _tree(watch), "home": _tree(w.home)}
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("linearize:")]
    interrupted = message == "linearize: interrupted"
    assert code == (130 if interrupted else 2), err[-5:]
    assert len(ours) == 1 and ours == err[-1:] and message in ours[0], err[-5:]
    assert interrupted or ours[0].startswith("linearize: error: ")
    assert not any("Traceback" in line for line in err)
    # What was given is unchanged and nothing was written (a failed start leaves no run folder behind).
    assert {"work": _tree(watch), "home": _tree(w.home)} == watched
    assert not (tmp_path / "pwned").exists()


def test_battery_size():
    assert len(CASES) >= 60


def test_convert_and_generate_from_local_folder(tmp_path, assets, capsys):
    out = tmp_path / "conv"
    code = main(["convert", "--model", str(assets.tiny), "--out", str(out), "--set", "attention.feature_dim=8",
                 "--set", "attention.softmax_layers=[1]"])  # fmt: skip
    assert code == 0
    assert {"config.json", "model.safetensors", "modeling_linearize.py", "linearize_recipe.yaml"} <= {
        p.name for p in out.iterdir()
    }
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "linearized_llama"
    assert config.linearize["attention"]["feature_dim"] == 8 and config.linearize["layers"]["1"] == "softmax"
    # The teacher is recorded by its folder name only: no local path goes into an uploadable file.
    assert config.linearize["base_model"] == "tiny"
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


def test_finished_run_records_names_not_paths(assets):
    for rel in ("config.json", "run/summary.json", "linearize_recipe.yaml"):
        text = (assets.done / rel).read_text()
        assert str(assets.root) not in text, rel
    summary = json.loads((assets.done / "run" / "summary.json").read_text())
    assert summary["model"] == "tiny" and summary["data"] == "local file words.txt"
