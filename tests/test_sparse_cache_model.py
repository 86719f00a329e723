"""The sparse cache (LoLA, or a learned scorer) in a converted model: settings and their errors, decoding equal to
the full forward, export and reload, the cache's bytes, and `linearize eval --sparse-cache` on a trained-free
student."""

import json

import pytest
import torch
from tiny_models import randomise_new_parameters, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from linearize.attention import LinearizeCache, converted_modules
from linearize.attention.footprint import cache_bytes_at
from linearize.attention.sparse_cache import set_sparse_cache
from linearize.cli import main
from linearize.config import AttentionConfig, from_dict
from linearize.errors import LinearizeError
from linearize.kernels.hybrid.sparse import SparseState
from linearize.models.convert import convert
from linearize.models.export import save_converted


def _converted(**attention):
    settings = dict(kind="lolcats", window=4, feature_dim=8) | attention
    model = convert(tiny_model("llama"), AttentionConfig(**settings))
    randomise_new_parameters(model)
    return model


def _ids(batch=2, length=9, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sparse_cache=-1), "sparse_cache must be an integer >= 0"),
        (dict(sparse_cache=1.5), "sparse_cache must be an integer >= 0"),
        (dict(sparse_cache=True), "sparse_cache must be an integer >= 0"),
        (dict(sparse_cache=4, sparse_block=0), "sparse_block must be an integer >= 1"),
        (dict(kind="hedgehog", sparse_cache=4), "'hedgehog' has none; kinds that take it: lolcats"),
        (dict(sparse_cache=4, window=0), "needs attention.window >= 1"),
        (dict(sparse_cache=4, sparse_scorer="attention"), "sparse_scorer must be one of recall, learned"),
        (dict(sparse_scorer="learned"), "needs a sparse cache: set attention.sparse_cache >= 1"),
        (dict(sparse_cache=4, window=3, sparse_scorer="learned"), "set attention.window >= 4, got 3"),
    ],
)
def test_settings_errors_are_one_line(settings, message):
    with pytest.raises(LinearizeError, match=message) as err:
        AttentionConfig(**settings)
    assert "\n" not in str(err.value)


def test_settings_from_a_recipe_mapping():
    cfg = from_dict(AttentionConfig, {"kind": "lolcats", "sparse_cache": 64, "sparse_block": None})
    assert (cfg.sparse_cache, cfg.sparse_block) == (64, None)
    with pytest.raises(LinearizeError, match="attention.sparse_cache"):
        from_dict(AttentionConfig, {"sparse_cache": "many"}, prefix="attention.")


@pytest.mark.parametrize("scorer", ["recall", "learned"])
def test_generate_equals_the_full_forward_and_the_cache_size_is_counted(scorer):
    # A head-level hybrid with a softmax layer: the kept pairs live beside the linear kv heads only.
    model = _converted(
        sparse_cache=2, sparse_block=3, softmax_heads={"1": [1]}, softmax_layers=[2], sparse_scorer=scorer
    )
    prompt = _ids()
    cache = LinearizeCache(model.config)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(prompt, cache=cache, **greedy)
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 8:-1], atol=1e-5, rtol=1e-4)
    assert isinstance(cache.layers[0].state, SparseState) and isinstance(cache.layers[1].state.linear, SparseState)
    # 16 tokens seen: boundaries after 2, 5, ..., 14 put pairs in the cache of every linear kv head.
    assert (cache.layers[0].state.cache_pos >= 0).all()
    assert cache.nbytes() == cache_bytes_at(model.config, 16, batch=2, dtype_bytes=4)["total"]
    if scorer == "learned":
        return
    plain = cache_bytes_at(_converted(softmax_heads={"1": [1]}, softmax_layers=[2]).config, 16, 2, 4)["layers"]["0"]
    # Layer 0: 2 kv heads x 2 pairs x (keys and values of 16 fp32 numbers + an int64 position), and 3 - 1 more
    # raw tokens of 2 kv heads (keys and values) plus their mask byte, per row.
    extra = 2 * (2 * 2 * (2 * 16 * 4 + 8) + 2 * (2 * 2 * 16 * 4 + 1))
    assert cache_bytes_at(model.config, 16, 2, 4)["layers"]["0"] == plain + extra


@pytest.mark.parametrize("scorer", ["recall", "learned"])
def test_gradients_reach_the_new_parameters_through_the_kept_pairs(scorer):
    model = _converted(sparse_cache=2, sparse_block=2, sparse_scorer=scorer)
    model(_ids(length=12), labels=_ids(length=12)).loss.backward()
    for module in converted_modules(model).values():
        named = module.named_new_parameters()
        assert any(n.startswith("token_scorer.") for n in named) == (scorer == "learned")
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())


def test_export_reloads_with_the_cache_and_switching_it_off_restores_the_plain_op(tmp_path):
    model = _converted(sparse_cache=2, sparse_block=3)
    ids = _ids(length=14)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["linearize"]["attention"]
    assert (stored["sparse_cache"], stored["sparse_block"]) == (2, 3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {m.sparse_cache for m in converted_modules(loaded).values()} == {2}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
        plain = _converted()
        before = plain(ids).logits
        assert set_sparse_cache(plain, 2, 3) == 4
        torch.testing.assert_close(plain(ids).logits, want)
        assert not torch.allclose(plain(ids).logits, before)
        set_sparse_cache(plain, 0)
        assert torch.equal(plain(ids).logits, before)
    assert plain.config.linearize["attention"]["sparse_cache"] == 0
    with pytest.raises(LinearizeError, match="--sparse-cache must be an integer >= 0"):
        set_sparse_cache(plain, -2)


def test_a_learned_scorer_is_saved_reloaded_and_resized_but_not_removed(tmp_path):
    model = _converted(sparse_cache=2, sparse_block=3, sparse_scorer="learned")
    ids = _ids(length=14)
    with torch.no_grad():
        want = model(ids).logits
        recall = _converted(sparse_cache=2, sparse_block=3)
        recall.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(recall(ids).logits, want)  # the scorer chose other pairs
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["linearize"]["attention"]["sparse_scorer"] == "learned"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    assert set_sparse_cache(loaded, 3) == 4
    with pytest.raises(LinearizeError, match="can resize but not remove: pass K >= 1"):
        set_sparse_cache(loaded, 0)


def test_eval_applies_the_cache_and_names_it(tmp_path, capsys):
    tok = tiny_tokenizer()
    save_converted(_converted(), tok, tmp_path / "student")
    save_converted(_converted(kind="hedgehog"), tok, tmp_path / "hedgehog")
    (tmp_path / "t.txt").write_text("the city of paris is the capital of france " * 10)
    common = [
        "--tasks",
        f"ppl:{tmp_path / 't.txt'}",
        "--no-controls",
        "--cache-lengths",
        "64",
        "--context-lengths",
        "32",
    ]
    out = tmp_path / "rep"
    args = ["eval", "--model", str(tmp_path / "student"), *common, "--out", str(out), "--sparse-cache", "2"]
    assert main([*args, "--sparse-block", "3", "--compare", f"hh={tmp_path / 'hedgehog'}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparse_cache"] == {"pairs": 2, "block": 3, "models": ["student"]}
    # The cache table measures the real cache: the kept pairs and the longer tail are in it.
    cache = {row["model"]: row["at"]["64"]["total"] for row in report["long_context"]["cache"]}
    assert cache["student"] == cache_bytes_at(_converted(sparse_cache=2, sparse_block=3).config, 64, 1, 4)["total"]
    assert cache["student"] > cache_bytes_at(_converted().config, 64, 1, 4)["total"]
    assert "Sparse cache set for this evaluation: 2 past key/value pairs" in (out / "report.md").read_text()
    capsys.readouterr()
    bad = ["eval", "--model", str(tmp_path / "hedgehog"), *common, "--out", str(tmp_path / "r2"), "--sparse-cache", "2"]
    assert main(bad) == 2
    assert "takes no sparse cache; kinds that take it (with a window >= 1): lolcats" in capsys.readouterr().err
    assert main([*args[:-2], "--sparse-block", "3"]) == 2
    assert "--sparse-block is set without --sparse-cache" in capsys.readouterr().err


def test_model_card_names_the_cache():
    from linearize.card import _attention_section

    lines = _attention_section({"attention": {"kind": "lolcats", "window": 4, "sparse_cache": 2}, "layers": {}})
    assert "| sparse cache | 2 past pairs per kv head (LoLA), updated every 4 tokens |" in lines
    settings = {"kind": "lolcats", "window": 4, "sparse_cache": 2, "sparse_scorer": "learned", "sparse_block": 8}
    lines = _attention_section({"attention": settings, "layers": {}})
    assert "| sparse cache | 2 past pairs per kv head (chosen by a learned scorer), updated every 8 tokens |" in lines


def test_a_bf16_model_trains_its_fp32_scorer():
    # As the pipeline trains on a GPU: the model in bf16, its new parameters (the scorer among them) in fp32.
    model = _converted(sparse_cache=2, sparse_block=2, sparse_scorer="learned").to(torch.bfloat16)
    for module in converted_modules(model).values():
        module.float_new_parameters()
    loss = model(_ids(length=12), labels=_ids(length=12)).loss
    loss.backward()
    scorer = [p for m in converted_modules(model).values() for p in m.token_scorer.parameters()]
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 and p.grad is not None for p in scorer)
