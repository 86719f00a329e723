"""linearize: turn a pretrained Hugging Face decoder into a linear-attention model, and measure what it kept.

From Python: `linearize.train(model, recipe="lolcats", out=...)` runs the main job (convert, attention transfer,
fine-tuning, export, report) and `linearize.evaluate(model, teacher=...)` writes the recovery report; the
`linearize` command calls the same functions.

Importing the package registers the `Linearized*` config and model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads converted folders. The registration waits for transformers
to be imported (at once when it already is), so `import linearize` and `linearize --help` stay quick.
"""

import importlib
import sys

from .api import Evaluation, evaluate, train
from .errors import LinearizeError

__version__ = "0.1.0"

# Imported on first use: they bring torch and transformers.
_LAZY = {
    "ATTENTION_KINDS": ".attention",
    "LinearizeCache": ".attention",
    "AttentionConfig": ".config",
    "Recipe": ".config",
    "load_recipe": ".config",
    "FAMILIES": ".models",
    "convert": ".models",
}

__all__ = ["Evaluation", "LinearizeError", "evaluate", "train", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        _register()
        return value
    raise AttributeError(f"module 'linearize' has no attribute '{name}'")


def __dir__():
    return sorted({*globals(), *_LAZY})


def _register() -> None:
    """Register the converted classes, unless a module of this package is still being imported: then the
    classes' own module may be half-imported, and the loading paths (`load_model`, `linearize.models`) and the
    lazy attributes above register them anyway."""
    if "transformers" not in sys.modules:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("linearize.") and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return
    importlib.import_module(".models.hf", __name__)


class _AfterTransformers:
    """A meta-path finder that lets transformers import as usual, then registers the converted classes."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    import importlib.util  # noqa: F401  (used by the finder)

    sys.meta_path.insert(0, _AfterTransformers())
