"""linearize: turn a pretrained Hugging Face decoder into a linear-attention model, and measure what it kept.

Importing the package registers the `Linearized*` config and model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads converted folders.
"""

from .attention import ATTENTION_KINDS, LinearizeCache
from .config import AttentionConfig, Recipe, load_recipe
from .errors import LinearizeError
from .models import FAMILIES, convert

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KINDS",
    "FAMILIES",
    "AttentionConfig",
    "LinearizeCache",
    "LinearizeError",
    "Recipe",
    "convert",
    "load_recipe",
]
