"""Atomic checkpoints of a training stage: trainable tensors, optimiser, schedule, RNG states and step.

A checkpoint is written to a temporary file and renamed over the previous one, so a crash or `kill -9` at any
moment leaves either the old checkpoint or the new one, never a torn file. Checkpoints are read back with
`weights_only=True`: a run folder may come from elsewhere, and unpickling arbitrary objects would run its code.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import LinearizeError, first_line
from ..fileio import atomic_write

STATE_FILE = "state.pt"
FINAL_FILE = "final.pt"


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(named_params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in named_params.items()}


def load_trainable(named_params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(named_params) - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks {missing[:3]}")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def save_stage_state(folder: Path, step: int, named_params, optimizer, scheduler, extra: dict | None = None) -> None:
    atomic_save(
        {
            "step": step,
            "params": trainable_state(named_params),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": extra or {},
        },
        Path(folder) / STATE_FILE,
    )


def load_checkpoint(path: Path, what: str = "the checkpoint") -> dict:
    """Read a file written by `atomic_save` (tensors, numbers, strings and containers only; no code runs)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn, foreign or malicious files
        raise LinearizeError(
            f"{path} ({what}) cannot be read safely ({first_line(exc)[:120]}): it is damaged or was not written by "
            f"linearize; delete it to redo that part with --resume, or start over with --overwrite"
        ) from None
    if not isinstance(state, dict):
        raise LinearizeError(
            f"{path} ({what}) holds no linearize checkpoint: delete it, or start over with --overwrite"
        )
    return state


def load_stage_state(folder: Path) -> dict | None:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    return load_checkpoint(path, "the stage's last checkpoint")
