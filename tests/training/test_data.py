"""Reading and packing the training text: positions restart at every document, file formats, clear errors."""

import json

import pytest
import torch

from ssm_hub.training.config import DataSection
from ssm_hub.training.data import PackedDataset, character_tokenizer, pack, read_documents, train_and_eval_datasets


def test_pack_restarts_positions_at_every_document_and_row_and_appends_eos():
    packed = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]], seq_len=4, eos_token_id=0)
    # stream: 5 6 7 0 | 8 9 0 10 | 11 12 13 14 | 15 16 0 (dropped); the last document goes on across two rows
    torch.testing.assert_close(packed["input_ids"], torch.tensor([[5, 6, 7, 0], [8, 9, 0, 10], [11, 12, 13, 14]]))
    # A row that carries a document on counts from 0 too: it is a model call of its own.
    torch.testing.assert_close(packed["position_ids"], torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]))
    row = PackedDataset(packed)[1]
    assert torch.equal(row["labels"], row["input_ids"]) and set(row) == {"input_ids", "position_ids", "labels"}


def test_pack_drops_only_the_short_tail_and_refuses_too_little_data():
    assert pack([[1] * 10], seq_len=4, eos_token_id=None)["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="fewer than one row of data.seq_len = 8"):
        pack([[1, 2, 3]], seq_len=8, eos_token_id=None)


def test_documents_from_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond\n\n\n\nthird")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["x y", "", "z"]))
    data = DataSection(files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_field="body")
    assert read_documents(data) == ["first document", "second", "third", "x y", "z"]
    assert read_documents(DataSection(files=[str(tmp_path / "a.txt")], max_documents=2)) == ["first document", "second"]


def test_bad_files_are_named(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match=r"records \[0\] of .*b.jsonl are not objects with a string 'text' field"):
        read_documents(DataSection(files=[str(tmp_path / "b.jsonl")]))
    with pytest.raises(ValueError, match="is not a file"):
        read_documents(DataSection(files=[str(tmp_path / "missing.txt")]))
    (tmp_path / "d.json").write_text(json.dumps(["a string, not a record"]))
    with pytest.raises(ValueError, match=r"records \[0\] of .*d.json are not objects with a string 'text' field"):
        read_documents(DataSection(files=[str(tmp_path / "d.json")]))
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\n{"text": ')
    with pytest.raises(ValueError, match=r"e.jsonl is not valid JSONL"):
        read_documents(DataSection(files=[str(tmp_path / "e.jsonl")]))
    (tmp_path / "c.csv").write_text("a,b")
    with pytest.raises(ValueError, match="neither .txt, .json nor .jsonl"):
        read_documents(DataSection(files=[str(tmp_path / "c.csv")]))


def test_character_tokenizer_has_one_token_per_character_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    documents = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak."]
    tokenizer = character_tokenizer(documents)
    assert len(tokenizer) == len(set("".join(documents))) + 1 and tokenizer.eos_token_id == 0
    text = "Speak,\nhear me."
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == ids
    with pytest.raises(Exception, match="UNK"):  # a character the documents never held is not silently replaced
        tokenizer("Q").input_ids
    # Where the data is tokenized for training or distillation, the characters it lacks are named.
    data = DataSection(seq_len=4, eval_fraction=0)
    with pytest.raises(ValueError, match=r"no token for 2 character\(s\) of the data, \['Q', 'x'\]"):
        train_and_eval_datasets(["Speak, Quixote."], tokenizer, data)
