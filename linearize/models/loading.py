"""Load a causal LM and its tokenizer from an alias, a local folder, a GGUF file or a Hub id.

GGUF files are dequantized once and cached as a normal safetensors folder (under `$LINEARIZE_CACHE`, default
`~/.cache/linearize`), so the second load takes about a second. A Hub id that is neither cached nor reachable
fails at once with one line instead of a series of retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import LinearizeError, first_line
from ..fileio import give_usual_modes
from .aliases import ALIASES

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A loaded model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    folder: Path


def cache_dir() -> Path:
    return Path(os.environ.get("LINEARIZE_CACHE", Path.home() / ".cache" / "linearize"))


def resolve(source: str) -> tuple[str, str]:
    """Classify `source` as ("gguf", path), ("folder", path) or ("hub", repo_id), resolving aliases."""
    if source in ALIASES:
        alias = ALIASES[source]
        return ("gguf", str(alias.gguf_path())) if alias.bundled else ("hub", alias.target)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinearizeError(f"GGUF file {path} does not exist")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LinearizeError(f"folder {path} has no config.json: point --model at a Hugging Face model folder")
        return "folder", str(path)
    if path.exists():
        raise LinearizeError(f"{path} is neither a model folder nor a .gguf file")
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)
    if looks_like_path or source.count("/") != 1:
        raise LinearizeError(
            f"model '{source}' is not a known alias, an existing folder, a .gguf file or a Hub id (org/name); "
            "run `linearize models` for the aliases"
        )
    return "hub", source


def _gguf_folder(gguf: Path) -> Path:
    """Dequantize `gguf` into a cached safetensors folder (once) and return the folder."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    logger.info("dequantizing %s (once; cached in %s)", gguf.name, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise LinearizeError(f"reading GGUF files needs the gguf package: pip install gguf ({exc})") from None
    except (ValueError, OSError, KeyError, EOFError, IndexError, struct.error) as exc:
        raise LinearizeError(
            f"could not read GGUF file {gguf}: {first_line(exc)[:200]}; check that the file is complete "
            "(size, checksum) or download it again"
        ) from None
    # The weights are plain tensors once dequantized; dropping the quantizer makes the model serialisable.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        give_usual_modes(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_folder(repo_id: str) -> str:
    """Check a Hub id can be loaded (cached, or the Hub answers) before transformers starts retrying."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return repo_id
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise LinearizeError(
            f"'{repo_id}' is not in the local Hugging Face cache and the Hub cannot be reached: connect to the "
            "network, or pass a local folder, a .gguf file or a bundled alias (linearize models)"
        )
    return repo_id


def _load_tokenizer(target: str):
    try:
        return AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no usable tokenizer in %s (%s); the model loads without one", target, str(exc)[:120])
        return None


def peek_config(source: str) -> dict | None:
    """config.json of `source` read without loading weights (None for GGUF files and uncached Hub ids)."""
    import json

    kind, target = resolve(source)
    path = None
    if kind == "folder":
        path = Path(target) / "config.json"
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(target, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LinearizeError(f"{path} is not valid JSON ({first_line(exc)[:120]}): repair or re-download it") from None
    if not isinstance(config, dict):
        raise LinearizeError(f"{path} does not hold a JSON object: repair or re-download it")
    return config


def check_convertible(source: str, seq_len: int | None = None) -> None:
    """Refuse, from config.json alone, a model that cannot be converted (or trained at `seq_len` tokens)."""
    from .families import FAMILIES

    config = peek_config(source)
    if config is None:
        return
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("linearized_"):
        raise LinearizeError(f"{source} is already converted; pass the original checkpoint to convert again")
    if model_type not in FAMILIES:
        raise LinearizeError(
            f"architecture '{model_type}' is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    limit = config.get("max_position_embeddings")
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        raise LinearizeError(
            f"data.seq_len={seq_len} is beyond the model's position limit (max_position_embeddings={limit}): "
            f"set data.seq_len to {limit} or less"
        )


def load_model(source: str, dtype: str = "auto", device: str | None = None) -> Loaded:
    """Load a causal LM and its tokenizer.

    Args:
        source: alias (`linearize models`), local folder, `.gguf` file or Hub id.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: where to put the model (default: stays on CPU).

    Returns:
        A `Loaded` with the model in eval mode.
    """
    from . import hf  # noqa: F401  (converted folders load through the registered classes)

    if dtype not in DTYPES:
        raise LinearizeError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    kind, target = resolve(source)
    if kind == "gguf":
        target = str(_gguf_folder(Path(target)))
    elif kind == "hub":
        target = _hub_folder(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=DTYPES[dtype])
    except (OSError, ValueError, SafetensorError) as exc:
        raise LinearizeError(
            f"could not load '{source}': {first_line(exc)[:200]}; check that its files are complete or download "
            "them again"
        ) from None
    tokenizer = _load_tokenizer(target)
    if device:
        model.to(device)
    return Loaded(model=model.eval(), tokenizer=tokenizer, source=source, folder=Path(target))
