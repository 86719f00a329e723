"""benchmarks/compare_revisions.py times two versions of the package in separate processes; without a GPU its
plumbing is checked: each side imports its own package (started inside the repository, both would import the
working tree), and bad arguments are refused with what to pass."""

import shutil
import subprocess
import sys
import textwrap
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


def test_an_unpacked_package_stands_in_for_a_revision(tmp_path):
    # --ref-dir: a folder holding another version's package (a GPU host's copy may lack the revision's history).
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "linearize"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    result = _run("--ref-dir", str(tmp_path), "--check-imports")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert Path(lines[str(tmp_path)]) == tmp_path.resolve() and Path(lines["working tree"]) == ROOT


def test_table_gives_the_mean_of_each_side_over_runs(tmp_path):
    # A stand-in for bench_hybrid.py (which needs a GPU): the working tree's package takes 10% longer than the
    # revision's in every case, and the second run 0.2 ms longer than the first on both sides.
    (tmp_path / "bench_hybrid.py").write_text(
        textwrap.dedent(f"""
            import os
            import linearize

            WORK = os.path.abspath(linearize.__file__).startswith({str(ROOT)!r} + os.sep)

            def _inputs(B, T, H, Hkv, D):
                return [B * T / 16384, Hkv, "v", "wq", "wk", "wf"]

            def _ours(*args):
                return None

            def _fwd_bwd(run, leaves):
                # Calls so far on this side, counted in a file of the processes' shared working folder.
                stamp = os.path.join(os.getcwd(), f"calls-{{WORK}}")
                n = sum(1 for _ in open(stamp)) if os.path.exists(stamp) else 0
                with open(stamp, "a") as f:
                    f.write("x\\n")
                base = leaves[0] * (1.1 if WORK else 1.0)
                return base, base + 0.2 * (n // 2)
        """)
    )
    result = _run("--ref", "HEAD", "--runs", "2", "--cases", "1x16384x32x64x0", "2x16384x8x0x1",
                  "--bench-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| case (BxTxHKVxWxSAVED) | HEAD ms | working tree ms | change |" in result.stdout.splitlines()
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1x") or line.startswith("| 2x")]
    # Per side, two cases per process: run 1 gives 1.0 and 2.0 (or 1.1 and 2.2), run 2 adds 0.2; means add 0.1.
    assert rows == [
        "| 1x16384x32x64x0 | 1.100 | 1.200 | +9.1% |",
        "| 2x16384x8x0x1 | 2.100 | 2.300 | +9.5% |",
    ], result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ref", "no-such-revision-anywhere", "--check-imports"], "git archive no-such-revision-anywhere"),
        (["--ref", "HEAD", "--cases", "1x16384x32x64"], "expected BxTxHKVxWxSAVED"),
        (["--ref", "HEAD", "--cases", "1x16384x5x64x0"], "key/value heads must divide 32"),
        (["--ref-dir", "benchmarks", "--check-imports"], "--ref-dir benchmarks: no linearize/__init__.py there"),
        (["--check-imports"], "one of the arguments --ref --ref-dir is required"),
        (["--ref", "HEAD", "--ref-dir", "benchmarks"], "not allowed with argument"),
    ],
)
def test_bad_arguments_say_what_to_pass(args, message):
    result = _run(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_grads_picks_the_leaves_that_ask_for_a_gradient(tmp_path):
    # The stand-in reports which leaves `_fwd_bwd` was given, as a number: attention transfer's are the feature
    # maps' weights and the window factor, LoRA fine-tuning's q, k and v.
    (tmp_path / "bench_hybrid.py").write_text(
        textwrap.dedent("""
            NAMES = ["q", "k", "v", "wq", "wk", "wf"]

            def _inputs(B, T, H, Hkv, D):
                return list(NAMES)

            def _ours(*args):
                return None

            def _fwd_bwd(run, leaves):
                return 0.0, float(sum(10 ** NAMES.index(x) for x in leaves))
        """)
    )
    for grads, expected in (("transfer", "111000.000"), ("finetune", "111.000"), ("all", "111111.000")):
        result = _run("--ref", "HEAD", "--runs", "1", "--cases", "1x2048x32x64x0", "--grads", grads,
                      "--bench-dir", str(tmp_path))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"# forward+backward, gradients: {grads}" in result.stdout
        assert f"| 1x2048x32x64x0 | {expected} | {expected} | +0.0% |" in result.stdout, result.stdout
    assert "invalid choice" in _run("--ref", "HEAD", "--grads", "some").stderr
