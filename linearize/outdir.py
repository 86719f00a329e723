"""Output folders: one guard that says whether a folder may be written or replaced, and an atomic swap.

Every folder linearize writes (a model, a training run, a corpus, lm-eval tasks, a report) carries a small
marker file, `.linearize-output`, naming what wrote it. `--overwrite` replaces only a folder that is provably
ours (the marker, or for folders written before markers existed, a signature file) and holds nothing but the
files linearize writes; never the current folder or one holding it, the home folder, or a folder that is, holds
or sits inside an input. The new output is written beside the old one and swapped in only when complete, so an
error, a full disk or a `kill -9` leaves the old output whole.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import LinearizeError

MARKER = ".linearize-output"
STAGING_SUFFIX = ".linearize-new"
_OLD_SUFFIX = ".linearize-old"

_TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]
_TOKENIZER += ["added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken"]
_TOKENIZER += ["chat_template.jinja", "chat_template.json", "additional_chat_templates"]

# What each kind of output may hold (glob patterns); a folder with anything else is not replaced.
KNOWN_FILES: dict[str, list[str]] = {
    "model": [
        "config.json",
        "generation_config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "modeling_linearize.py",
        # The exported copy of the attention code (models/bundle.py).
        "linearize_*.py",
        "linearize_recipe.yaml",
        "README.md",
        "run",
        "report",
        *_TOKENIZER,
    ],
    "corpus": ["corpus.json", "train.jsonl", "heldout.txt", ".corpus.json.*", ".heldout.txt.*"],
    "lm-eval-tasks": ["utils.py", "*.jsonl", "linearize_*.yaml", "__pycache__"],
    "report": ["report.json", "report.md", "*.png"],
}

# Folders written before the marker existed are recognised by one file only linearize writes.
_SIGNATURES = {
    "model": [("config.json", '"linearize"'), ("run/recipe.yaml", "attention:")],
    "corpus": [("corpus.json", '"generated_tokens"')],
    "lm-eval-tasks": [("utils.py", "written by linearize")],
    "report": [("report.json", '"tasks"')],
}

# Our own leftovers (partial exports, temporary files) may sit in any output.
_OWN_HIDDEN = [MARKER, ".export-*", f"*{STAGING_SUFFIX}*", f"*{_OLD_SUFFIX}*", ".*.partial-*"]

DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def describe_os_error(exc: OSError, what: str = "") -> str:
    """One line for a disk or permission failure, saying what to do."""
    cure = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EDQUOT: "free some space or choose another --out",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "check the folder's permissions or choose another --out",
        errno.EPERM: "check the folder's permissions or choose another --out",
    }.get(exc.errno, "check the disk and try again")
    where = exc.filename or what or "a file"
    return f"{where}: {exc.strerror or exc}: {cure}; no previous output was replaced"


def read_marker(folder: Path) -> dict | None:
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, kind: str, **meta) -> None:
    from . import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "linearize": __version__, **meta}, indent=2) + "\n")


def _is_known(kind: str, name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in [*KNOWN_FILES[kind], *_OWN_HIDDEN])


def _has_signature(folder: Path, kind: str) -> bool:
    for name, needle in _SIGNATURES.get(kind, []):
        try:
            if (folder / name).is_file() and needle in (folder / name).read_text(errors="replace")[:200_000]:
                return True
        except OSError:
            continue
    return False


def _input_paths(inputs: Iterable[str | Path | None]) -> list[Path]:
    paths = []
    for item in inputs:
        if not item:
            continue
        path = Path(str(item).removeprefix("ppl:")).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def refuse_dangerous(out: Path, inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> None:
    """Refuse to replace a folder whose removal would take something that is not a previous output with it."""
    target = Path(out).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise LinearizeError(f"{flag} {out} is the current folder or holds it: name a new folder for the output")
    if target == home or target in home.parents or target == Path(target.anchor):
        raise LinearizeError(f"{flag} {out} is the home folder or above it: name a new folder for the output")
    for path in _input_paths(inputs):
        if target == path or target in path.parents or path in target.parents:
            raise LinearizeError(
                f"{flag} {out} is, holds or sits inside the input {path}: write the output to another folder"
            )


def check_ours(folder: Path, kind: str, flag: str = "--out") -> dict:
    """The folder's marker (or {} for an older output recognised by its files); raises if it is not ours."""
    marker = read_marker(folder)
    if marker is None and not _has_signature(folder, kind):
        raise LinearizeError(
            f"{flag} {folder} does not look like a linearize {kind} output (no {MARKER} marker): linearize only "
            "replaces folders it wrote; choose another folder or empty it yourself"
        )
    if marker is not None and marker.get("kind") != kind:
        raise LinearizeError(f"{flag} {folder} holds a linearize {marker.get('kind')} output, not a {kind}: "
                             "choose another folder")  # fmt: skip
    foreign = sorted(p.name for p in folder.iterdir() if not _is_known(kind, p.name))
    if foreign:
        raise LinearizeError(
            f"{flag} {folder} holds files linearize did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): move them out or choose another folder"
        )
    return marker or {}


def check_output(
    out: str | Path,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | Path | None] = (),
    flag: str = "--out",
    hint: str = "",
) -> str:
    """The one guard every command runs on its output folder before any work.

    Args:
        out: the folder the command will write.
        kind: what it writes: a key of `KNOWN_FILES` ("model", "corpus", "lm-eval-tasks", "report").
        overwrite: the user asked to replace a previous output.
        resume: the user asked to continue the output in place.
        inputs: models and data files the command reads (local paths are protected; other names are ignored).
        flag: the option name used in messages.
        hint: extra advice for the "not empty" refusal (e.g. "pass --resume to continue its run, ").

    Returns:
        "new" (absent or empty: write it), "resume" (ours: continue it) or "replace" (ours: write beside, swap).

    Raises:
        LinearizeError: one line naming the problem and what to do.
    """
    if not str(out).strip():
        raise LinearizeError(f"{flag} is empty: name the output folder")
    if resume and overwrite:
        raise LinearizeError("--resume continues the run in --out and --overwrite starts over: pass only one")
    out = Path(out).expanduser()
    target = out.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise LinearizeError(f"{flag} {out} is the current folder or holds it: name a new folder for the output")
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"{flag} {out} is a file, not a folder: choose a folder path")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise LinearizeError(f"{flag} {out} lies under {parent}, which is a file: choose a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            raise LinearizeError(f"--resume: {out} holds nothing to resume; drop --resume")
        return "new"
    if resume:
        check_ours(out, kind, flag)
        return "resume"
    if not overwrite:
        raise LinearizeError(
            f"{flag} {out} already exists and is not empty: {hint}choose another folder, or pass --overwrite to "
            "replace it"
        )
    refuse_dangerous(out, inputs, flag)
    check_ours(out, kind, flag)
    return "replace"


def staging_folder(out: Path) -> Path:
    """Where a replacement of `out` is assembled: a hidden sibling holding a folder of the same name."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}" / out.name


def publish(work: Path, out: Path) -> None:
    """Move the finished folder `work` to `out`, replacing what is there; the old folder goes only afterwards."""
    work, out = Path(work), Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{_OLD_SUFFIX}-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if work.parent.name.endswith(STAGING_SUFFIX):
        with contextlib.suppress(OSError):
            work.parent.rmdir()


def discard(work: Path) -> None:
    """Remove a staging folder (and its hidden parent when that is ours and empty)."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    if work.parent.name.endswith(STAGING_SUFFIX) or ".partial-" in work.parent.name:
        shutil.rmtree(work.parent, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: str | Path, kind: str, overwrite: bool = False, inputs: Iterable = (), **meta) -> Iterator[Path]:
    """Guard `out`, yield an empty staging folder, and swap it into place when the block succeeds.

    A failure inside the block (an error, a full or read-only disk) removes the staging folder and leaves `out`
    as it was; disk errors become one-line `LinearizeError`s.
    """
    out = Path(out).expanduser()
    check_output(out, kind, overwrite=overwrite, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)) / out.name
        work.mkdir()
    except OSError as exc:
        raise LinearizeError(describe_os_error(exc, str(out))) from None
    try:
        yield work
        write_marker(work, kind, **meta)
        publish(work, out)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise LinearizeError(describe_os_error(exc, str(out))) from None
        raise
    finally:
        if work.exists():
            discard(work)
        elif work.parent.exists() and ".partial-" in work.parent.name:
            shutil.rmtree(work.parent, ignore_errors=True)
