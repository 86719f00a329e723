"""Pushing a converted folder: the file list, the model card, refusals, and a real push to a local Hub stand-in."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_standin import running_standin
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_token
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

import linearize
from linearize import LinearizeError, convert, load_recipe
from linearize.cli import main
from linearize.hub import check_reloads, files_to_upload, push, render_model_card
from linearize.models.bundle import collect, flat_name
from linearize.models.export import save_converted

TOKEN = "hf_standin_dummy_token"
BASE = "meta-llama/Llama-3.2-1B"

# The copy of the attention code that modeling_linearize.py loads.
CODE = [flat_name(rel) for rel in collect(Path(linearize.__file__).parent)]
# What a repo gets from the folder built below; README.md is the rendered card.
EXPECTED = sorted(
    [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "linearize_recipe.yaml",
        "model.safetensors",
        "modeling_linearize.py",
        "report/recovery.png",
        "report/report.json",
        "report/report.md",
        "run/metrics.jsonl",
        "run/summary.json",
        "tokenizer.json",
        "tokenizer_config.json",
        *CODE,
    ]
)

REPORT = {
    "model": "tiny-lolcats",
    "teacher": BASE,
    "created": "2026-11-25",
    "tasks": [
        {"task": "piqa", "metric": "acc", "n": 200, "teacher": 0.64, "student": 0.61, "chance": 0.5,
         "recovery": 0.953, "recovery_above_chance": 0.786},
        {"task": "arc_easy", "metric": "acc_norm", "n": 200, "teacher": 0.5, "student": 0.47, "chance": 0.25,
         "recovery": 0.94, "recovery_above_chance": 0.88},
    ],
    "averages": {"zero_shot": {"teacher": 0.57, "student": 0.54, "recovery": 0.9465, "recovery_above_chance": 0.833}},
    "perplexity": [{"source": "offline", "teacher": 21.3, "student": 24.9}],
}  # fmt: skip

SUMMARY = {
    "model": BASE,
    "data": "offline corpus",
    "dtype": "float32",
    "world_size": 1,
    "stages": [
        {"name": "transfer", "steps": 4, "tokens": 4096, "seconds": 1.5, "first_loss": 9.5, "final_loss": 3.25,
         "val_loss": 3.5},
        {"name": "finetune", "steps": 2, "tokens": 2048, "seconds": 0.5, "first_loss": 4.0, "final_loss": 3.75,
         "val_loss": None},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny converted llama folder laid out like `linearize train` output, plus files that must stay local."""
    folder = tmp_path_factory.mktemp("export") / "tiny-lolcats"
    model = tiny_model("llama")
    recipe = load_recipe("lolcats", ["attention.window=8", "attention.feature_dim=8", "attention.softmax_layers=[1]"])
    convert(model, recipe.attention, base_model=BASE)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_converted(model, tokenizer, folder, recipe)
    run = folder / "run"
    (run / "checkpoints" / "transfer").mkdir(parents=True)
    (run / "checkpoints" / "transfer" / "model.safetensors").write_bytes(b"checkpoint")
    (run / "data.pt").write_bytes(b"cached tokens")
    (run / "log.txt").write_text(f"saved to {folder}\n")
    (run / "recipe.yaml").write_text("name: lolcats\n")
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "metrics.jsonl").write_text('{"stage": "transfer", "step": 0, "loss": 9.5}\n')
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text(json.dumps(REPORT))
    (folder / "report" / "report.md").write_text("# report\n")
    (folder / "report" / "recovery.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / ".model.safetensors.partial").write_bytes(b"half")
    return folder


@pytest.fixture
def folder(exported, tmp_path):
    """A private copy of the exported folder that a test may break."""
    return shutil.copytree(exported, tmp_path / "tiny-lolcats")


@pytest.fixture
def hub(monkeypatch):
    """A running Hub stand-in, with huggingface_hub allowed online and kept away from the real Hub."""
    # conftest sets HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every request.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    # Building the user agent would fetch an agent registry from huggingface.co; an empty one keeps it local.
    monkeypatch.setattr(
        "huggingface_hub.utils._detect_agent._registry", {"standardEnvVars": [], "harnesses": {}}, raising=False
    )
    # With hf_xet installed LFS files would go to Xet storage, which the stand-in does not serve.
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    with running_standin(TOKEN) as standin:
        yield standin


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert get_token() is None


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_to_upload_leaves_run_state_and_hidden_files_out(exported):
    names = [p.relative_to(exported).as_posix() for p in files_to_upload(exported)]
    assert names == [n for n in EXPECTED if n != "README.md"]


def test_dry_run_lists_files_and_card_and_sends_nothing(folder, hub, no_token):
    before = _snapshot(folder)
    result = push(folder, "me/tiny-lolcats", dry_run=True, endpoint=hub.url)
    assert [f["path"] for f in result["files"]] == EXPECTED
    sizes = {f["path"]: f["size"] for f in result["files"]}
    assert sizes["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert sizes["README.md"] == len(result["card"].encode())
    assert result["commit_url"] is None and result["dry_run"]
    assert f"base_model: {BASE}" in result["card"]
    assert hub.requests == []
    assert _snapshot(folder) == before


@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
def test_push_makes_one_commit_with_the_folder_bytes(folder, hub, private):
    before = _snapshot(folder)
    result = push(folder, "me/tiny-lolcats", private=private, token=TOKEN, endpoint=hub.url)
    assert hub.repos == {"me/tiny-lolcats": {"private": private, "type": "model"}}
    assert len(hub.commits) == 1 and not hub.unexpected
    commit = hub.commits[0]
    assert commit.repo_id == "me/tiny-lolcats" and commit.revision == "main"
    assert sorted(commit.files) == EXPECTED
    for name in EXPECTED[1:]:
        assert commit.files[name] == (folder / name).read_bytes(), name
    # The weights went through the LFS batch API, as on the real Hub; the rest as base64 in the commit.
    assert commit.lfs_paths == ["model.safetensors"]
    card = commit.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and f"base_model: {BASE}" in card
    assert "pip install" not in card and "pypi" not in card.lower() and "import linearize" not in card
    assert "PyTorch alone load the model (`torch" in card and ", `transformers" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-lolcats", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("me/tiny-lolcats", trust_remote_code=True)' in card
    assert result["commit_url"] == f"{hub.url}/me/tiny-lolcats/commit/{result['commit_oid']}"
    assert result["repo_url"] == f"{hub.url}/me/tiny-lolcats"
    assert _snapshot(folder) == before


def test_push_to_an_existing_repo_adds_a_commit(folder, hub):
    push(folder, "me/tiny-lolcats", private=True, token=TOKEN, endpoint=hub.url)
    push(folder, "me/tiny-lolcats", token=TOKEN, endpoint=hub.url, commit_message="again")
    assert hub.repos["me/tiny-lolcats"]["private"] and len(hub.commits) == 2
    assert hub.commits[1].summary == "again"


def _delete_weights(folder):
    (folder / "model.safetensors").unlink()


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _nan_weights(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _drop_a_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if "feature_map" in n)
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _old_modeling_file(folder):
    # What exports wrote before folders carried their code: it needs the linearize package itself.
    (folder / "modeling_linearize.py").write_text("from linearize.models.hf import LinearizedLlamaForCausalLM\n")


def _delete_a_code_file(folder):
    (folder / "linearize_attention_cache.py").unlink()


def _not_linearized(folder):
    shutil.rmtree(folder)
    save_tiny("llama", folder)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_delete_weights, "has no model.safetensors"),
        (_truncate_weights, "does not load"),
        (_nan_weights, "non-finite logits"),
        (_drop_a_tensor, "does not reload strictly (missing keys: "),
        (_not_linearized, "holds a 'llama' model, not a linearized one"),
        (_old_modeling_file, "has a modeling_linearize.py that needs the linearize package installed"),
        (_delete_a_code_file, "lacks linearize_attention_cache.py, which modeling_linearize.py loads"),
    ],
    ids=[
        "weights-deleted",
        "weights-truncated",
        "nan-weights",
        "missing-tensor",
        "not-linearized",
        "old-modeling-file",
        "code-file-deleted",
    ],
)
def test_broken_folder_is_refused_before_anything_is_sent(folder, hub, breakage, message):
    breakage(folder)
    before = _snapshot(folder)
    with pytest.raises(LinearizeError) as err:
        push(folder, "me/tiny-lolcats", token=TOKEN, endpoint=hub.url)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert hub.requests == []
    assert _snapshot(folder) == before


def test_check_reloads_accepts_the_good_folder(exported):
    check_reloads(exported)


def test_missing_token_is_one_clear_error(folder, hub, no_token):
    with pytest.raises(LinearizeError, match=r"hf auth login.*HF_TOKEN") as err:
        push(folder, "me/tiny-lolcats", endpoint=hub.url)
    assert "\n" not in str(err.value) and hub.requests == []


def test_rejected_token_reports_the_http_status(folder, hub):
    with pytest.raises(LinearizeError, match="HTTP 401") as err:
        push(folder, "me/tiny-lolcats", token="hf_wrong", endpoint=hub.url)
    assert "\n" not in str(err.value) and not hub.commits
    # On 401 with exist_ok, huggingface_hub asks whether the repo exists before giving up; nothing is uploaded.
    assert hub.requests[0] == ("POST", "/api/repos/create")
    assert set(hub.requests[1:]) <= {("GET", "/api/models/me/tiny-lolcats")}


def test_refused_commit_reports_the_server_message_and_leaves_the_folder(folder, hub):
    hub.commit_error = (403, "You are not allowed to push to this branch")
    before = _snapshot(folder)
    with pytest.raises(LinearizeError) as err:
        push(folder, "me/tiny-lolcats", token=TOKEN, endpoint=hub.url)
    message = str(err.value)
    assert (
        message.startswith("uploading to me/tiny-lolcats failed (HTTP 403: You are not allowed") and "\n" not in message
    )
    assert not hub.commits and _snapshot(folder) == before


def test_unreachable_hub_is_one_line(folder, hub):
    # A stand-in that has been stopped leaves a port where nothing listens.
    with running_standin(TOKEN) as stopped:
        url = stopped.url
    with pytest.raises(LinearizeError, match="creating me/tiny-lolcats failed") as err:
        push(folder, "me/tiny-lolcats", token=TOKEN, endpoint=url)
    assert "\n" not in str(err.value)


def test_card_sections_follow_the_files_present(folder):
    card = render_model_card(folder, "me/tiny-lolcats")
    assert "| piqa | acc | 0.64 | 0.61 | 95.3% | 78.6% |" in card
    assert "| **average (zero-shot)** |  | 0.57 | 0.54 | 94.7% | 83.3% |" in card
    assert "| transfer | 4 | 4,096 | 1.5 | 9.5 | 3.25 | 3.5 |" in card
    assert "| layers kept softmax | 1 |" in card and "| converted layers | 3 of 4 |" in card
    assert "| softmax window | 8 tokens |" in card and "| feature dimension | 8 |" in card
    transfer_tokens = load_recipe("lolcats").stages[0].tokens
    assert (
        f"stage 1, attention transfer: {transfer_tokens:,} tokens" in card
        and "![recovery](report/recovery.png)" in card
    )
    assert str(folder) not in card
    for optional in ("report/report.json", "run/summary.json", "linearize_recipe.yaml"):
        (folder / optional).unlink()
    bare = render_model_card(folder)
    assert "## Evaluation" not in bare and "## Training" not in bare and "## Recipe" not in bare
    assert "## Attention" in bare and 'from_pretrained("tiny-lolcats", trust_remote_code=True)' in bare


def test_card_keeps_local_paths_private(folder):
    config = json.loads((folder / "config.json").read_text())
    config["linearize"]["base_model"] = "/home/someone/models/my-llama"
    (folder / "config.json").write_text(json.dumps(config))
    report = dict(REPORT, teacher="/home/someone/models/my-llama")
    report["perplexity"] = [{"source": "/home/someone/notes.txt", "teacher": 20.0, "student": 22.0}]
    (folder / "report" / "report.json").write_text(json.dumps(report))
    card = render_model_card(folder)
    assert "base_model:" not in card and "/home/someone" not in card
    assert "a local checkpoint (`my-llama`)" in card and "| notes.txt | 20 | 22 |" in card


def test_card_carries_a_stated_license_and_replaces_the_old_card(folder):
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# old card\n")
    card = render_model_card(folder)
    assert "\nlicense: apache-2.0\n" in card.split("---")[1] and "# old card" not in card
    assert "README.md" not in [p.name for p in files_to_upload(folder)]
    (folder / "README.md").unlink()
    assert "license:" not in render_model_card(folder)


def test_cli_push_dry_run(folder, no_token, capsys):
    code = main(["push", str(folder), "--repo-id", "me/tiny-lolcats", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    for name in EXPECTED:
        assert name in out
    assert "run/data.pt" not in out and "checkpoints" not in out and "nothing was uploaded" in out


def test_cli_push_refusal_is_one_line(folder, hub, capsys, monkeypatch):
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    (folder / "model.safetensors").unlink()
    code = main(["push", str(folder), "--repo-id", "me/tiny-lolcats", "--token", TOKEN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no model.safetensors" in err[0] and hub.requests == []


def test_offline_mode_is_refused_with_its_cure(folder, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LinearizeError, match="HF_HUB_OFFLINE is set: unset it to push"):
        push(folder, "me/tiny-lolcats", token=TOKEN, endpoint="http://127.0.0.1:9")
