"""Write a converted model as a normal Hugging Face folder.

The folder is assembled beside its destination and swapped in only when complete (`linearize.outdir`), so an
error or an interrupt never leaves a half-written output folder behind. What is recorded about the inputs names
Hub ids and aliases as given and local files by their name only, so an uploaded folder carries no local paths.
Weights are written in the teacher's dtype unless asked otherwise: training may compute in fp32, but a bf16
teacher's student in fp32 would be twice the size for no gain.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import Recipe, to_dict
from ..fileio import give_usual_modes

RECIPE_FILE = "linearize_recipe.yaml"


def public_name(source: str | None) -> str | None:
    """`source` as given when it is a Hub id or alias; else the name of the local folder or file."""
    from .loading import resolve

    if not source:
        return source
    try:
        kind, _ = resolve(source)
    except Exception:
        kind = "local"
    if kind == "hub" or source in _aliases():
        return source
    return Path(str(source).rstrip("/")).name or str(source)


def _aliases():
    from .aliases import ALIASES

    return ALIASES


def public_recipe(recipe: Recipe) -> dict:
    """The recipe as a plain dict, with a local data path reduced to its name."""
    data = to_dict(recipe)
    dataset = data["data"]["dataset"]
    if dataset not in ("auto", "offline") and Path(dataset).expanduser().exists():
        data["data"]["dataset"] = Path(dataset.rstrip("/")).name
    return data


def export_dtype(choice: str, source: str, compute: str):
    """The torch dtype to write: `choice` unless "auto"; then the checkpoint dtype of `source` (a GGUF, or a
    checkpoint that records none, gives `compute`, the dtype the model was computed in)."""
    import torch

    from .loading import DTYPES, resolve

    name = choice
    if choice == "auto":
        name = compute
        kind, target = resolve(source)
        if kind != "gguf":
            from transformers import AutoConfig

            recorded = getattr(AutoConfig.from_pretrained(target), "dtype", None)
            recorded = str(recorded).removeprefix("torch.") if recorded is not None else None
            if recorded in ("float32", "bfloat16", "float16"):
                name = recorded
    dtype = DTYPES.get(name)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_converted(model, tokenizer, folder: Path, recipe: Recipe | None = None, dtype=None) -> None:
    """Save model (safetensors + config + modeling code), tokenizer and the recipe into `folder`.

    With `dtype` (a torch dtype), every floating parameter, the fp32 attention parameters included, is cast to it
    first; `model` is cast in place.
    """
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        (Path(folder) / RECIPE_FILE).write_text(yaml.safe_dump(public_recipe(recipe), sort_keys=False))
    # transformers writes the safetensors through tempfile (mode 0600): give them the usual permissions.
    give_usual_modes(folder)
