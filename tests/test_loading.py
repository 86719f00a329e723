"""Model sources: aliases, GGUF files, local folders and Hub ids (served from a local Hub cache)."""

import pytest
from tiny_models import save_tiny

from linearize.errors import LinearizeError
from linearize.models import loading
from linearize.models.aliases import ALIASES


def test_resolve_each_source_kind(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert loading.resolve(str(folder)) == ("folder", str(folder))
    assert loading.resolve(str(gguf)) == ("gguf", str(gguf))
    assert loading.resolve("llama-3-8b") == ("hub", "meta-llama/Meta-Llama-3-8B")
    assert loading.resolve("org/name") == ("hub", "org/name")
    kind, path = loading.resolve("smollm2-135m")
    assert kind == "gguf" and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_every_family_has_aliases():
    from linearize.models.families import FAMILIES

    covered = {a.family for a in ALIASES.values()}
    assert set(FAMILIES) <= covered
    assert all(a.family in FAMILIES for a in ALIASES.values())


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(LinearizeError, match="has no config.json"):
        loading.resolve(str(tmp_path))


def test_hub_id_loads_from_local_hub_cache(tmp_path, monkeypatch):
    hub_cache = tmp_path / "hub"
    snapshot = hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    save_tiny("llama", snapshot)
    (hub_cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub_cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    loaded = loading.load_model("tiny-org/tiny-llama")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.tokenizer is not None


def test_gguf_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    first = loading.load_model("smollm2-135m")
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    stamp = (folders[0] / "model.safetensors").stat().st_mtime_ns
    second = loading.load_model("smollm2-135m")
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.model.config.num_hidden_layers == second.model.config.num_hidden_layers == 30


def test_truncated_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    real = ALIASES["smollm2-135m"].gguf_path()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real.read_bytes()[:1_000_000])
    with pytest.raises(LinearizeError, match="could not read GGUF file .*cut.gguf.*complete"):
        loading.load_model(str(cut))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(LinearizeError, match="could not read GGUF file"):
        loading.load_model(str(bad))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
