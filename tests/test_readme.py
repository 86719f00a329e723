"""Every ```python block of README.md runs as written.

Each block runs in a fresh subprocess (offline, with a timeout) whose working folder holds what the README's
commands would have left there: `out/smol` is a tiny random-weight model converted and exported by
`linearize convert`, standing in for the main job's output.

The block's code runs unchanged. What a block names that would take an hour on a CPU is swapped for a tiny
stand-in, and only that: before the block runs, `linearize.train` and `linearize.evaluate` are wrapped so that the
alias `smollm2-135m` means the tiny model, and the recipe overrides and evaluation budget gain tiny sizes (a
32-token sequence, a few hundred training tokens on a local word list, 2 documents per task). Everything else the
block does (the calls, their arguments, the fields it reads from the results, the files it loads) is checked for
real.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny, write_words

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [
    (ROOT / "README.md").read_text()[: m.start()].count("\n") + 1
    for m in re.finditer(r"^```python\n", (ROOT / "README.md").read_text(), flags=re.M)
]

PRELUDE = """
import linearize, linearize.api

TINY, WORDS = {tiny!r}, {words!r}
TINY_SETS = {{"data.seq_len": 32, "data.dataset": WORDS, "attention.feature_dim": 8, "attention.window": 8,
              "transfer.tokens": 256, "finetune.tokens": 128, "report.enabled": False}}
_train, _evaluate = linearize.api.train, linearize.api.evaluate


def _tiny(name):
    return TINY if name == "smollm2-135m" else name


def train(model="smollm2-135m", recipe="lolcats", out="out/smol", overrides=(), **kwargs):
    items = dict(overrides) if isinstance(overrides, dict) else dict(item.split("=", 1) for item in overrides)
    return _train(_tiny(model), recipe, out, {{**items, **TINY_SETS}}, **kwargs)


def evaluate(model, teacher=None, **kwargs):
    return _evaluate(_tiny(model), teacher=_tiny(teacher), **{{**kwargs, "limit": 2, "controls": False}})


linearize.train, linearize.evaluate = train, evaluate
"""


def _block(line: int) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()[line:]
    return "\n".join(lines[: lines.index("```")]) + "\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from linearize.cli import main

    root = tmp_path_factory.mktemp("readme")
    tiny = save_tiny("llama", root / "tiny")
    words = root / "words.txt"
    write_words(words, 60)
    exported = root / "out" / "smol"
    assert main(["convert", "--model", str(tiny), "--out", str(exported), "--set", "attention.feature_dim=8"]) == 0
    return tiny, words, exported


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line", BLOCKS, ids=[f"README.md:{n}" for n in BLOCKS])
def test_python_block_runs(line, assets, tmp_path):
    tiny, words, exported = assets
    shutil.copytree(exported, tmp_path / "out" / "smol")
    script = tmp_path / "block.py"
    script.write_text(PRELUDE.format(tiny=str(tiny), words=str(words)) + "\n# README.md\n" + _block(line))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, f"README.md block at line {line} failed:\n{run.stderr[-3000:]}"
