"""Output folders done right: --overwrite swaps a finished new output in (the old one stays whole until then and
after any failure), an interrupted replacement resumes beside the old output, the NaN-stop advice works as
printed, resumed steps are logged once, and lm-eval task folders are replaced only when they are ours."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import save_tiny, write_words

from linearize import outdir
from linearize.cli import main
from linearize.config import OptimConfig, RunConfig
from linearize.data.sources import MAX_NOT_TEXT, _read_text
from linearize.errors import LinearizeError
from linearize.train.loop import Dist, run_stage

SETS = [
    "data.seq_len=16",
    "attention.feature_dim=4",
    "attention.window=4",
    "transfer.tokens=128",
    "finetune.tokens=128",
    "run.checkpoint_every=2",
    "report.enabled=false",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    words = root / "words.txt"
    write_words(words, 40)
    return save_tiny("llama", root / "tiny"), words


def _train(inputs, out, *extra, flags=()):
    tiny, words = inputs
    argv = ["--model", str(tiny), "--out", str(out), *flags]
    for item in [*SETS, f"data.dataset={words}", *extra]:
        argv += ["--set", item]
    return main(argv)


def _window(out):
    return json.loads((out / "config.json").read_text())["linearize"]["attention"]["window"]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_swaps_the_new_run_in_only_when_it_is_complete(tmp_path, inputs, monkeypatch):
    out = tmp_path / "out"
    assert _train(inputs, out) == 0
    assert outdir.read_marker(out)["kind"] == "model" and outdir.read_marker(out / "run")["kind"] == "run"
    seen = []
    publish = outdir.publish

    def checked_publish(work, target):
        # The old output is whole while the new one is written beside it.
        seen.append(_window(target))
        publish(work, target)

    monkeypatch.setattr(outdir, "publish", checked_publish)
    assert _train(inputs, out, "attention.window=8", flags=["--overwrite"]) == 0
    assert seen == [4] and _window(out) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_overwrite_keeps_the_old_output_and_resumes_beside_it(tmp_path, inputs, monkeypatch, caplog):
    from linearize.train.finetune import FinetuneObjective

    out = tmp_path / "out"
    assert _train(inputs, out) == 0
    before = _snapshot(out)

    def interrupt(self, batch, scale=1.0):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(FinetuneObjective, "backward", interrupt)
        assert _train(inputs, out, "attention.window=8", flags=["--overwrite"]) == 130
    after = _snapshot(out)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k != "run/log.txt")
    staging = outdir.staging_folder(out)
    assert (staging / "run" / "checkpoints" / "transfer" / "final.pt").is_file()
    caplog.set_level("INFO")
    assert _train(inputs, out, "attention.window=8", flags=["--resume"]) == 0
    assert "stage transfer already finished" in caplog.text
    assert _window(out) == 8 and not staging.parent.exists()


def test_kill_9_during_an_overwrite_run_leaves_the_old_output_whole(tmp_path, inputs):
    # A real process killed with SIGKILL: nothing in the process gets to clean up.
    tiny, words = inputs
    out = tmp_path / "out"
    assert _train(inputs, out) == 0
    before = _snapshot(out)
    argv = [sys.executable, "-m", "linearize.cli", "--model", str(tiny), "--out", str(out), "--overwrite"]
    for item in [*SETS, f"data.dataset={words}", "transfer.tokens=4096", "attention.window=8"]:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = outdir.staging_folder(out) / "run" / "checkpoints" / "transfer" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before its first checkpoint"
    after = _snapshot(out)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before)
    assert _train(inputs, out, "transfer.tokens=4096", "attention.window=8", flags=["--resume"]) == 0
    assert _window(out) == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_nan_stop_advice_works_as_printed(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    unstable = ["finetune.optim.lr=1e30", "finetune.optim.max_grad_norm=0"]
    assert _train(inputs, out, *unstable) == 2
    advice = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan" in advice and "rerun with --resume and --set finetune.optim.lr=<smaller>" in advice
    assert _train(inputs, out, "finetune.optim.lr=1e-4", "finetune.optim.max_grad_norm=0", flags=["--resume"]) == 0
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    finetune = [r for r in rows if r["stage"] == "finetune" and "loss" in r]
    assert [r["step"] for r in finetune] == [0, 1] and {r["lr"] for r in finetune} == {1e-4}


def test_resumed_steps_are_logged_once_with_the_new_learning_rate(tmp_path, caplog):
    w = torch.nn.Parameter(torch.ones(3))

    def make_step(stop_at=None):
        def step_fn(step):
            if step == stop_at:
                raise KeyboardInterrupt
            loss = (w * w).sum()
            loss.backward()
            return {"loss": loss.item()}

        return step_fn

    args = (10, 1)
    run_cfg = RunConfig(checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        run_stage("transfer", {"w": w}, OptimConfig(lr=0.1), *args, make_step(6), tmp_path, run_cfg, Dist(), False)
    caplog.set_level("INFO")
    run_stage("transfer", {"w": w}, OptimConfig(lr=0.05), *args, make_step(), tmp_path, run_cfg, Dist(), True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))
    assert [r["lr"] for r in rows] == [0.1] * 4 + [0.05] * 6
    assert "resuming stage transfer at step 4" in caplog.text and "steps left, about" in caplog.text


def test_lm_eval_tasks_replace_only_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["lm-eval-tasks", "--out", "tasks", "--tasks", "piqa", "--limit", "2"]
    assert main(args) == 0
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0
    yaml_text = (tmp_path / "tasks" / "linearize_piqa.yaml").read_text()
    # The YAML names its data where the folder ended up, not where it was assembled.
    assert json.dumps(str((tmp_path / "tasks" / "piqa.jsonl").resolve())) in yaml_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]


def test_text_files_with_a_few_bad_bytes_are_read_and_binary_ones_refused(tmp_path):
    path = tmp_path / "t.txt"
    text = "the city " * 1000
    n_bad = int(len(text) * MAX_NOT_TEXT / 2)
    path.write_bytes(text.encode() + b"\xff" * n_bad)
    assert _read_text(path).startswith("the city")
    path.write_bytes(text.encode() + b"\xff" * (4 * n_bad))
    with pytest.raises(LinearizeError, match="not UTF-8 text"):
        _read_text(path)


def test_corpus_overwrite_replaces_its_own_corpus_in_one_swap(tmp_path, inputs):
    from tiny_models import tiny_model, tiny_tokenizer

    from linearize.data.synthesize import CorpusSettings, write_corpus

    _, words = inputs
    out = tmp_path / "corpus"
    settings = dict(tokens=8, prompts=str(words), max_new_tokens=4, batch_size=2)
    write_corpus(tiny_model("llama"), tiny_tokenizer(), out, CorpusSettings(**settings), progress=False)
    with pytest.raises(LinearizeError, match="pass --resume to continue it"):
        write_corpus(tiny_model("llama"), tiny_tokenizer(), out, CorpusSettings(**settings), progress=False)
    info = write_corpus(tiny_model("llama"), tiny_tokenizer(), out, CorpusSettings(**settings, seed=3),
                        overwrite=True, progress=False)  # fmt: skip
    assert info["settings"]["seed"] == 3 and json.loads((out / "corpus.json").read_text())["settings"]["seed"] == 3
    assert outdir.read_marker(out)["kind"] == "corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_interrupted_corpus_overwrite_resumes_beside_the_old_corpus(tmp_path, inputs, monkeypatch):
    from tiny_models import tiny_model, tiny_tokenizer

    from linearize.data import synthesize
    from linearize.data.synthesize import CorpusSettings, write_corpus

    _, words = inputs
    out = tmp_path / "corpus"
    settings = dict(tokens=16, prompts=str(words), max_new_tokens=4, batch_size=2)
    write_corpus(tiny_model("llama"), tiny_tokenizer(), out, CorpusSettings(**settings), progress=False)
    before = _snapshot(out)
    sample, calls = synthesize._sample_batch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args)

    new = CorpusSettings(**settings, seed=5)
    with monkeypatch.context() as mp:
        mp.setattr(synthesize, "_sample_batch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_corpus(tiny_model("llama"), tiny_tokenizer(), out, new, overwrite=True, progress=False)
    assert _snapshot(out) == before
    info = write_corpus(tiny_model("llama"), tiny_tokenizer(), out, new, resume=True, progress=False)
    assert info["complete"] and json.loads((out / "corpus.json").read_text())["settings"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
