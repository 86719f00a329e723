"""Loading checkpoints, converting them, and the registered Hugging Face classes of converted models."""

from . import hf  # noqa: F401  (registers the Linearized* classes with the Auto classes)
from .convert import convert, plan_layers
from .families import FAMILIES, family_for

__all__ = ["FAMILIES", "convert", "family_for", "plan_layers"]
