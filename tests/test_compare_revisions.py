"""benchmarks/compare_revisions.py times two versions of the package in separate processes; without a GPU its
plumbing is checked: each side imports its own package (started inside the repository, both would import the
working tree), and bad arguments are refused with what to pass."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compare_revisions.py"

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and the repository's history"
)


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_each_side_imports_its_own_package():
    result = _run("--ref", "HEAD", "--check-imports")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    ref, work = Path(lines["HEAD"]), Path(lines["working tree"])
    assert work == ROOT
    # The revision's package is unpacked outside the repository, and that copy is what its process imported.
    assert ROOT not in ref.parents and ref.name == "ref"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ref", "no-such-revision-anywhere", "--check-imports"], "git archive no-such-revision-anywhere"),
        (["--ref", "HEAD", "--cases", "1x16384x32x64"], "expected BxTxHKVxWxSAVED"),
        (["--ref", "HEAD", "--cases", "1x16384x5x64x0"], "key/value heads must divide 32"),
    ],
)
def test_bad_arguments_say_what_to_pass(args, message):
    result = _run(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
