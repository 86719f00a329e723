"""`linearize corpus`: teacher-sampled distillation text, a held-out split, and resuming an interrupted run."""

import json

import pytest
from tiny_models import WORDS, save_tiny, tiny_model, tiny_tokenizer

from linearize import cli
from linearize.data import synthesize
from linearize.data.synthesize import CorpusSettings, split_documents, write_corpus
from linearize.errors import LinearizeError


@pytest.fixture
def docs_file(tmp_path):
    words = [w for w in WORDS if w.isalpha()]
    lines = [" ".join(words[(7 * i + j) % len(words)] for j in range(12)) for i in range(20)]
    path = tmp_path / "docs.jsonl"  # one row per document
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path, lines


def _settings(docs_file, **kw):
    base = dict(tokens=60, prompts=str(docs_file), prompt_tokens=4, max_new_tokens=8, batch_size=3, seed=1)
    return CorpusSettings(**{**base, **kw})


def test_split_is_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45 and not set(train) & set(held)
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    assert split_documents(docs, 0.1, seed=4) != (train, held)
    assert split_documents(docs, 0.0, seed=3) == (docs, [])


def test_corpus_files(tmp_path, docs_file):
    path, lines = docs_file
    tok = tiny_tokenizer()
    info = write_corpus(tiny_model("llama"), tok, tmp_path / "c", _settings(path), model_name="tiny", progress=False)
    assert info["complete"] and info["generated_tokens"] >= 60
    rows = [json.loads(line)["text"] for line in (tmp_path / "c" / "train.jsonl").read_text().splitlines()]
    held = (tmp_path / "c" / "heldout.txt").read_text().strip().split("\n\n")
    assert len(held) == 2 and set(held) <= set(lines)
    train_docs = [d for d in lines if d not in held]
    # Sampled rows come first, then the real training documents; no row starts with a held-out prompt.
    n_sampled = info["rows"] - len(train_docs)
    assert n_sampled > 0 and rows[n_sampled:] == train_docs
    for row in rows[:n_sampled]:
        prefix = " ".join(row.split()[:4])
        assert any(d.startswith(prefix) for d in train_docs)
        assert not any(d.startswith(prefix) for d in held)
        assert len(row.split()) > 4  # a continuation was sampled after the 4-token prompt
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["rows"] == len(rows)


def test_resume_after_interruption_gives_the_same_file(tmp_path, docs_file, monkeypatch):
    path, _ = docs_file
    tok = tiny_tokenizer()
    settings = _settings(path)
    write_corpus(tiny_model("llama"), tok, tmp_path / "full", settings, progress=False)

    real = synthesize._sample_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            # A batch half-written when the process dies: a partial line after the last recorded batch.
            with open(tmp_path / "cut" / "train.jsonl", "a") as fh:
                fh.write('{"text": "partial')
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesize, "_sample_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        write_corpus(tiny_model("llama"), tok, tmp_path / "cut", settings, progress=False)
    monkeypatch.setattr(synthesize, "_sample_batch", real)
    with pytest.raises(LinearizeError, match="--resume"):
        write_corpus(tiny_model("llama"), tok, tmp_path / "cut", settings, progress=False)
    info = write_corpus(tiny_model("llama"), tok, tmp_path / "cut", settings, resume=True, progress=False)
    assert info["complete"]
    assert (tmp_path / "cut" / "train.jsonl").read_bytes() == (tmp_path / "full" / "train.jsonl").read_bytes()
    with pytest.raises(LinearizeError, match="other settings"):
        write_corpus(tiny_model("llama"), tok, tmp_path / "cut", _settings(path, seed=2), resume=True, progress=False)


def test_cli_corpus_and_errors(tmp_path, docs_file, capsys):
    path, _ = docs_file
    model = save_tiny("llama", tmp_path / "m")
    out = tmp_path / "c"
    args = ["corpus", "--model", str(model), "--out", str(out), "--prompts", str(path), "--tokens", "40",
            "--prompt-tokens", "4", "--max-new-tokens", "8", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert "train.jsonl" in capsys.readouterr().out
    assert json.loads((out / "corpus.json").read_text())["complete"]
    assert cli.main(args) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main([*args, "--tokens", "lots", "--overwrite"]) == 2
    assert "--tokens takes a number" in capsys.readouterr().err
    assert cli.main([*args, "--heldout", "1.5", "--overwrite"]) == 2
    assert "--heldout" in capsys.readouterr().err
    # A refused run leaves the finished corpus as it was.
    assert json.loads((out / "corpus.json").read_text())["complete"]
