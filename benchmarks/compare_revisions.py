"""Forward+backward time of the hybrid kernels at another git revision against the working tree, on one GPU.

Each version's package runs in its own process, the two alternating, `--runs` times, so that the GPU's drift
reaches both alike; each process times every case in place (`bench_hybrid.py`'s `_fwd_bwd`, the median of
`triton.testing.do_bench`) and the table gives the mean over runs. The processes start in an empty folder outside
the repository: started inside it, `python` would import the working tree's package ahead of the one PYTHONPATH
names, and both columns would time the same code.

    python benchmarks/compare_revisions.py --ref 00c1d4d [--runs 2] [--cases 1x16384x32x64x0 8x2048x32x64x1]
                                           [--grads transfer]
    python benchmarks/compare_revisions.py --ref HEAD --check-imports   # no GPU: which package each side imports

On a machine whose copy of the repository lacks the revision (a GPU host that got the working tree only), unpack
its package beside the working tree first and pass the folder that holds it:

    git archive 00c1d4d linearize | tar -x -C old/      # where the revision is known
    python benchmarks/compare_revisions.py --ref-dir old/   # on the GPU host

A case is BxTxHKVxWxSAVED: batch, tokens, key/value heads (of 32 query heads, D = 128, F = 64), window, and 1 for
`LINEARIZE_SAVE_STATES=1`. `--grads` picks the leaves that ask for a gradient (`tuning.GRADS`): all of them, the
feature maps' weights and the window factor as attention transfer trains them (`transfer`), or q, k and v as LoRA
fine-tuning does (`finetune`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tuning import GRADS

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_CASES = ["1x16384x32x64x0", "1x16384x32x64x1", "1x32768x32x64x0", "8x2048x32x64x0", "1x16384x8x64x0",
                 "1x16384x32x0x0"]  # fmt: skip

# What each process runs: report the package it imported, then (unless only checking) time the cases.
CHILD = """
import json, os, sys
import linearize
out = {"package": os.path.dirname(os.path.dirname(os.path.abspath(linearize.__file__)))}
if sys.argv[1] != "check":
    from functools import partial
    import bench_hybrid as bh
    times = {}
    job = json.loads(sys.argv[1])
    for case in job["cases"]:
        B, T, hkv, W, saved = (int(x) for x in case.split("x"))
        os.environ["LINEARIZE_SAVE_STATES"] = str(saved)
        leaves = bh._inputs(B, T, 32, hkv, 128)
        times[case] = bh._fwd_bwd(partial(bh._ours, *leaves, W), [leaves[i] for i in job["asked"]])[1]
    out["times"] = times
print("RESULT " + json.dumps(out), flush=True)
"""


def parse_case(text: str) -> str:
    parts = text.split("x")
    if len(parts) != 5 or not all(p.isdigit() for p in parts) or parts[4] not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected BxTxHKVxWxSAVED such as 1x16384x32x64x0, got {text!r}")
    if 32 % int(parts[2]) or int(parts[3]) > 64:
        raise argparse.ArgumentTypeError(f"{text!r}: key/value heads must divide 32 and the window be at most 64")
    return text


def extract(ref: str, dest: Path) -> Path:
    """The `linearize` package of git revision `ref`, unpacked under `dest`; returns `dest`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "linearize"], capture_output=True, check=False
    )
    if archive.returncode:
        raise SystemExit(f"git archive {ref}: {archive.stderr.decode().strip() or 'failed'}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The "data" filter (Python 3.11.4 and newer) refuses members that would land outside `dest`.
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest


def unpacked(folder: Path) -> Path:
    """`folder`, once checked to hold a `linearize` package (`--ref-dir`)."""
    if not (folder / "linearize" / "__init__.py").is_file():
        raise SystemExit(f"--ref-dir {folder}: no linearize/__init__.py there; unpack a revision's package into it with "
                         "`git archive REV linearize | tar -x -C FOLDER`")  # fmt: skip
    return folder.resolve()


def run_side(package: Path, workdir: Path, arg: str, bench_dir: Path = BENCHMARKS) -> dict:
    """One process importing `package` (started in `workdir`, outside the repository) and `bench_hybrid` from
    `bench_dir`; its parsed result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(bench_dir)])}
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], cwd=workdir, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the process for {package} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    if Path(result["package"]).resolve() != package.resolve():
        raise SystemExit(f"the process for {package} imported linearize from {result['package']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    versus = parser.add_mutually_exclusive_group(required=True)
    versus.add_argument("--ref", help="git revision to compare the working tree against")
    versus.add_argument("--ref-dir", type=Path, help="folder holding the other version's linearize package")
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--cases", type=parse_case, nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--grads", choices=sorted(GRADS), default="all", help="the leaves that ask for a gradient")
    parser.add_argument("--check-imports", action="store_true", help="only report which package each side imports")
    parser.add_argument(
        "--bench-dir", type=Path, default=BENCHMARKS, help="folder whose bench_hybrid.py times a case (default: ours)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "ref").mkdir()
        (tmp / "run").mkdir()
        other = args.ref if args.ref else str(args.ref_dir)
        sides = {other: extract(args.ref, tmp / "ref") if args.ref else unpacked(args.ref_dir), "working tree": ROOT}
        if args.check_imports:
            for name, pkg in sides.items():
                print(f"{name}: {run_side(pkg, tmp / 'run', 'check')['package']}")
            return 0
        times: dict[str, list[dict]] = {name: [] for name in sides}
        job = json.dumps({"cases": args.cases, "asked": GRADS[args.grads]})
        for run in range(args.runs):
            for name, pkg in sides.items():
                times[name].append(run_side(pkg, tmp / "run", job, args.bench_dir)["times"])
                print(f"# run {run + 1}, {name}: " + " ".join(f"{times[name][-1][c]:.3f}" for c in args.cases),
                      flush=True)  # fmt: skip
    print(f"\n# forward+backward, gradients: {args.grads}")
    print(f"| case (BxTxHKVxWxSAVED) | {other} ms | working tree ms | change |")
    print("|---|---|---|---|")
    for case in args.cases:
        ref, work = (sum(t[case] for t in times[name]) / args.runs for name in sides)
        print(f"| {case} | {ref:.3f} | {work:.3f} | {100 * (work / ref - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
