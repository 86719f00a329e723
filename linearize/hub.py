"""Push a converted folder to the Hugging Face Hub as one commit, with a model card written from its own files.

The folder is checked first (it must reload as a linearized model and give finite logits), only the files a model
repo needs are sent (never checkpoints, cached data or logs), and the card is built from `config.json`, the recipe,
the run summary and the evaluation report, so it states what was converted, how, and what it kept.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from .card import _load_optional, _read_config, render_model_card
from .errors import LinearizeError, first_line
from .models.bundle import code_files
from .models.export import RECIPE_FILE

logger = logging.getLogger(__name__)

# Top-level files of a model repo; everything else in the folder stays local.
_TOP_LEVEL = {"config.json", "generation_config.json", "model.safetensors.index.json", "modeling_linearize.py"}
_TOP_LEVEL |= {RECIPE_FILE, "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "added_tokens.json"}
_TOP_LEVEL |= {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt"}
_TOP_LEVEL |= {"spiece.model"}
_TOP_LEVEL_SUFFIXES = (".safetensors", ".tiktoken")
_RUN_FILES = ("run/summary.json", "run/metrics.jsonl")
_REPORT_SUFFIXES = (".json", ".md", ".png")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def files_to_upload(folder: str | Path) -> list[Path]:
    """The files of `folder` that belong in its model repo, sorted by their path in the repo.

    Args:
        folder: an exported folder (`linearize convert` / `linearize train` output).

    Returns:
        Paths inside `folder`: config, weights, modeling code and its copy of the attention code, tokenizer,
        recipe, `report/*` (json, md, png) and `run/summary.json` + `run/metrics.jsonl`. Checkpoints, `run/data.pt`, `run/log.txt` (it holds absolute
        paths), an existing README.md (the card replaces it) and hidden or partial files are left out.

    Raises:
        LinearizeError: a file is a link to something outside `folder`.
    """
    folder = Path(folder)
    # The modeling file and the copy of the attention code it loads (models/bundle.py).
    code = set(code_files(folder))
    root = folder.resolve()
    chosen = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink() and root not in path.resolve().parents:
            # A link out of the folder would upload whatever it points at (any file on this machine).
            raise LinearizeError(
                f"{path} is a link to {path.resolve()}, outside {folder}: replace it with a copy of the file"
            )
        if not path.is_file():
            continue
        name = rel.as_posix()
        if len(rel.parts) == 1:
            keep = name in _TOP_LEVEL or name.endswith(_TOP_LEVEL_SUFFIXES) or name in code
        elif rel.parts[0] == "report":
            keep = name.endswith(_REPORT_SUFFIXES)
        elif rel.parts[0] == "additional_chat_templates":
            keep = name.endswith(".jinja")
        else:
            keep = name in _RUN_FILES
        if keep:
            chosen.append(path)
    return sorted(chosen, key=lambda p: p.relative_to(folder).as_posix())


def _check_files(folder: Path) -> None:
    """Cheap structural checks, so the common mistakes fail before any weight is read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set((_load_optional(index) or {}).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise LinearizeError(f"{folder} lacks weight shards {', '.join(missing)}: export the model again")
    elif not (folder / "model.safetensors").is_file():
        raise LinearizeError(f"{folder} has no model.safetensors: export the model again")
    from .models.bundle import code_problem

    problem = code_problem(folder)
    if problem:
        raise LinearizeError(f"{folder} {problem}: export the model again")


def check_reloads(folder: str | Path) -> None:
    """Refuse a folder that would not load back as the same linearized model.

    Loads it with `AutoModelForCausalLM.from_pretrained` (in the saved dtype), requires every weight to match
    (no missing, unexpected or mismatched keys) and runs one forward pass on four token ids, whose logits must be
    finite. Costs one load of the model.

    Args:
        folder: the exported folder.

    Raises:
        LinearizeError: one line saying what is wrong and what to do.
    """
    import torch
    from transformers import AutoModelForCausalLM

    # Importing the package registers the Linearized* classes with the Auto classes.
    import linearize  # noqa: F401

    folder = Path(folder)
    if not folder.is_dir():
        raise LinearizeError(f"{folder} is not a folder: pass the folder written by `linearize convert` or `train`")
    config = _read_config(folder)
    _check_files(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except Exception as exc:
        raise LinearizeError(f"{folder} does not load ({first_line(exc)}): export the model again") from exc
    bad = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if bad:
        detail = "; ".join(f"{key.replace('_', ' ')}: {', '.join(sorted(map(str, v))[:3])}" for key, v in bad.items())
        raise LinearizeError(f"{folder} does not reload strictly ({detail}): export the model again")
    vocab = int(config.get("vocab_size") or model.config.vocab_size)
    ids = (torch.arange(1, 5) % vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model.eval()(ids, use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise LinearizeError(f"{folder} gives non-finite logits: its weights hold NaN or inf; export a good checkpoint")
    logger.info("%s reloads strictly and gives finite logits", folder)


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x talks through httpx2 and 1.x through httpx; catch whichever it has imported.
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "HTTPError"):
            errors.append(module.HTTPError)
    return tuple(errors)


def _hub_error(exc: BaseException, step: str, repo_id: str) -> LinearizeError:
    from huggingface_hub.errors import HfHubHTTPError

    # LFS upload failures arrive wrapped in a RuntimeError whose cause is the HTTP error.
    cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc
    response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
    if response is None:
        return LinearizeError(f"{step} {repo_id} failed ({first_line(cause)}): check the network and the endpoint")
    detail = getattr(cause, "server_message", None) or first_line(cause)
    cure = {
        401: "check the token (`hf auth login` or HF_TOKEN)",
        403: "the token cannot write there: use a write token, or a namespace you own",
        404: "check the repo id",
    }.get(response.status_code, "try again, or check the repo id and token")
    return LinearizeError(f"{step} {repo_id} failed (HTTP {response.status_code}: {first_line(detail)}): {cure}")


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> dict:
    """Upload an exported folder and its model card to a Hub model repo, in one commit.

    Args:
        folder: the exported folder; it must reload strictly (see `check_reloads`). It is never modified: the
            card is sent from memory.
        repo_id: "namespace/name" (or "name" for the token's own namespace); created when missing.
        private: create the repo as private (an existing repo keeps its visibility).
        dry_run: check the folder and render the card, but contact nobody and need no token.
        token: Hub token; default HF_TOKEN or the cached login.
        endpoint: Hub URL; default the public Hub (or HF_ENDPOINT).
        commit_message: default "Upload <kind> linearized model with linearize".

    Returns:
        dict with repo_id, repo_url, commit_url and commit_oid (None in a dry run), files (list of
        {"path", "size"} in the repo, README.md included), card (the README.md text) and dry_run.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LinearizeError(f"--repo-id '{repo_id}' is not a valid Hub repo id: use namespace/name") from exc
    if not dry_run:
        token = token or get_token()
        if not token:
            raise LinearizeError(
                "no Hugging Face token: run `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"
            )
        if constants.HF_HUB_OFFLINE:
            raise LinearizeError("HF_HUB_OFFLINE is set: unset it to push, or use --dry-run")
    # Links out of the folder are refused before any file is read through them.
    paths = files_to_upload(folder)
    check_reloads(folder)
    card = render_model_card(folder, repo_id).encode()
    if not any(p.name.startswith("tokenizer") or p.name in ("vocab.json", "spiece.model") for p in paths):
        logger.warning("%s has no tokenizer files: the repo will hold a model that users cannot prompt", folder)
    files = [{"path": "README.md", "size": len(card)}]
    files += [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size} for p in paths]
    base_url = (endpoint or constants.ENDPOINT).rstrip("/")
    result = {
        "repo_id": repo_id,
        "repo_url": f"{base_url}/{repo_id}",
        "commit_url": None,
        "commit_oid": None,
        "files": files,
        "card": card.decode(),
        "dry_run": dry_run,
    }
    if dry_run:
        return result

    kind = _read_config(folder)["linearize"].get("attention", {}).get("kind", "linear")
    message = commit_message or f"Upload {kind} linearized model with linearize"
    api = HfApi(endpoint=endpoint, token=token)
    errors = (*_transport_errors(), ValueError, RuntimeError)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except errors as exc:
        raise _hub_error(exc, "creating", repo_id) from exc
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)]
    operations += [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p) for p in paths]
    logger.info("uploading %d files (%d bytes) to %s", len(files), sum(f["size"] for f in files), repo_url)
    try:
        commit = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except errors as exc:
        raise _hub_error(exc, "uploading to", repo_id) from exc
    result.update(repo_url=str(repo_url), commit_url=commit.commit_url, commit_oid=commit.oid)
    return result
