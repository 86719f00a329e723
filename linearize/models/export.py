"""Write a converted model as a normal Hugging Face folder, atomically.

The folder is assembled under a temporary sibling and renamed into place only when complete, so an error or an
interrupt never leaves a half-written output folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from ..config import Recipe, to_dict
from ..errors import LinearizeError

RECIPE_FILE = "linearize_recipe.yaml"


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse to write over a non-empty folder unless asked to."""
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LinearizeError(f"--out {out} already exists and is not empty: choose another folder or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` when the block succeeds and vanishes when it fails."""
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_converted(model, tokenizer, folder: Path, recipe: Recipe | None = None) -> None:
    """Save model (safetensors + config + modeling code), tokenizer and the recipe into `folder`."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        (Path(folder) / RECIPE_FILE).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
