"""Typed settings: recipes are YAML files that fill these dataclasses, never free-form dicts.

Every field has a type and a default; `from_dict` rejects unknown keys and values of the wrong type with the
dotted key named, and `apply_overrides` does the same for `--set a.b=value` on the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import LinearizeError

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class AttentionConfig:
    """Which attention replaces softmax, and where.

    Attributes:
        kind: registered attention kind (`linearize.attention.ATTENTION_KINDS`), default "lolcats".
        feature_dim: Hedgehog feature dimension F per half; the map outputs 2F features (default 64).
        window: exact-softmax sliding window in tokens for kinds that have one (default 64).
        init_window_factor: initial logit of the per-head window weight; sigmoid(-2.1972) = 0.1 (LoLCATs).
        softmax_layers: layer indices kept as the original softmax attention (a hybrid model).
        convert_sliding_layers: also convert layers that already use local sliding-window attention
            (Gemma 2/3); by default they are kept, since their cache is already bounded.
        chunk_size: tokens per chunk in the PyTorch path (default 128); does not change results.
    """

    kind: str = "lolcats"
    feature_dim: int = 64
    window: int = 64
    init_window_factor: float = -2.1972
    softmax_layers: list[int] = field(default_factory=list)
    convert_sliding_layers: bool = False
    chunk_size: int = 128

    def __post_init__(self):
        from .attention import ATTENTION_KINDS

        if self.kind not in ATTENTION_KINDS:
            raise LinearizeError(
                f"attention.kind '{self.kind}' is unknown; choose one of: {', '.join(sorted(ATTENTION_KINDS))}"
            )
        _positive("attention.feature_dim", self.feature_dim)
        _positive("attention.chunk_size", self.chunk_size)
        if self.window < 0:
            raise LinearizeError(f"attention.window must be >= 0, got {self.window}")
        if any(i < 0 for i in self.softmax_layers):
            raise LinearizeError(f"attention.softmax_layers must be layer indices >= 0, got {self.softmax_layers}")

    @property
    def effective_window(self) -> int:
        """The window the chosen kind actually uses (0 for kinds without one)."""
        from .attention import ATTENTION_KINDS

        return self.window if ATTENTION_KINDS[self.kind].uses_window else 0


@dataclass
class Recipe:
    """A complete conversion recipe.

    Attributes:
        name: short name shown in reports.
        description: one line on what the recipe does.
        attention: the attention swap.
    """

    name: str = "custom"
    description: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise LinearizeError(f"{key} must be > 0, got {value}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except LinearizeError:
                continue
        raise LinearizeError(f"recipe key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise LinearizeError(f"recipe key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LinearizeError(f"recipe key '{key}': expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise LinearizeError(f"recipe key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys and mistyped values by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise LinearizeError(
            f"unknown recipe key '{prefix}{unknown[0]}'; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Plain-dict form of a settings dataclass (for YAML, JSON and config.json)."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 4, 1e-3, true and [1, 2] get their types)."""
    if "=" not in text:
        raise LinearizeError(f"--set '{text}' must look like key.path=value, e.g. attention.window=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise LinearizeError(f"--set '{text}' has no key before '='")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], cls=Recipe) -> dict:
    """Apply `--set` overrides to a recipe mapping, checking each dotted key exists in `cls`."""
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls = data, cls
        for depth, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else {}
            if part not in names:
                key = ".".join(path[: depth + 1])
                raise LinearizeError(f"--set: unknown recipe key '{key}'")
            if depth == len(path) - 1:
                node[part] = value
            else:
                node_cls = typing.get_type_hints(node_cls)[part]
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise LinearizeError(f"--set: '{'.'.join(path[: depth + 1])}' is not a group of settings")
    return data


def bundled_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped in `linearize/recipes/`."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a bundled recipe by name or a YAML file by path, apply `--set` overrides, and validate."""
    bundled = bundled_recipes()
    path = Path(name_or_path)
    if str(name_or_path) in bundled:
        path = bundled[str(name_or_path)]
    elif not path.is_file():
        raise LinearizeError(
            f"recipe '{name_or_path}' is neither a bundled recipe ({', '.join(bundled)}) nor a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LinearizeError(f"recipe file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LinearizeError(f"recipe file {path} must hold a mapping of settings at the top level")
    data.setdefault("name", path.stem)
    apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)
