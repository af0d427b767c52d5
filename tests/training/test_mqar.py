"""The associative-recall task (ssm_hub.training.mqar): its documents, the builtin data source whose loss is on the
queried values alone, and the recall score, checked with a model that knows the answers and one that does not."""

import pytest
import torch

from ssm_hub.training.config import DataSection
from ssm_hub.training.data import character_tokenizer, pack, read_documents, train_and_eval_datasets
from ssm_hub.training.mqar import KEYS, QUERY_MARK, VALUES, answer_mask, mqar_documents, recall_accuracy


def test_documents_hold_distinct_keys_and_queries_that_repeat_their_pairs():
    documents = mqar_documents(50, pairs=8, queries=5, seed=3)
    assert documents == mqar_documents(50, pairs=8, queries=5, seed=3) != mqar_documents(50, pairs=8, queries=5)
    for document in documents:
        pairs, queries = document.split(QUERY_MARK)
        assert len(pairs) == 16 and len(queries) == 10
        values = dict(zip(pairs[0::2], pairs[1::2]))
        assert len(values) == 8 and set(values) <= set(KEYS) and set(values.values()) <= set(VALUES)
        assert all(values[key] == value for key, value in zip(queries[0::2], queries[1::2]))
    with pytest.raises(ValueError, match="queries must be in \\[1, pairs = 4\\]"):
        mqar_documents(1, pairs=4, queries=5)
    assert read_documents(DataSection(builtin="mqar", max_documents=7)) == mqar_documents(7)


class _Predictor(torch.nn.Module):
    """Logits that pick, at each position, the true next character (``oracle``) or always ``constant``."""

    def __init__(self, vocabulary: int, oracle: bool, constant: int = 0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # recall_accuracy reads the model's device from it
        self.vocabulary, self.oracle, self.constant = vocabulary, oracle, constant

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocabulary)
        if self.oracle:
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
        else:
            logits[..., self.constant] = 1.0
        return type("Output", (), {"logits": logits})


def test_recall_accuracy_scores_only_the_queried_values():
    documents = mqar_documents(40, pairs=6, queries=4)
    tokenizer = character_tokenizer(documents)
    assert recall_accuracy(_Predictor(len(tokenizer), oracle=True), tokenizer, documents, batch_size=16) == 1.0
    seven = tokenizer.convert_tokens_to_ids("7")
    expected = sum(document.split(QUERY_MARK)[1][1::2].count("7") for document in documents) / (40 * 4)
    always_seven = _Predictor(len(tokenizer), oracle=False, constant=seven)
    assert recall_accuracy(always_seven, tokenizer, documents) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one layout"):
        recall_accuracy(always_seven, tokenizer, documents[:2] + mqar_documents(1, pairs=5, queries=5))


def test_the_builtin_data_puts_the_loss_on_the_queried_values_alone():
    assert answer_mask("a1b2:b2") == [False] * 6 + [True]
    with pytest.raises(ValueError, match="not an MQAR document"):
        answer_mask("a1b2b2")
    data = DataSection(builtin="mqar", max_documents=30, seq_len=64, eval_fraction=0.2)
    documents = read_documents(data)
    tokenizer = character_tokenizer(documents)
    train, held_out = train_and_eval_datasets(documents, tokenizer, data)
    for dataset, texts in ((train, documents[:24]), (held_out, documents[24:])):
        counted = torch.cat([row["labels"] for row in dataset]) != -100
        ids = torch.cat([row["input_ids"] for row in dataset])[counted]
        answers = "".join(text.split(QUERY_MARK)[1][1::2] for text in texts)
        # every counted token is a queried value, in order (the packed tail that does not fill a row is dropped)
        assert 0 < len(ids) <= len(answers) and tokenizer.decode(ids) == answers[:len(ids)]
    with pytest.raises(ValueError, match="one token per character"):
        train_and_eval_datasets(documents, _WholeDocumentTokenizer(tokenizer), data)
    with pytest.raises(ValueError, match="one flag per token"):
        pack([[1, 2, 3]], 2, 0, loss_masks=[[True, False]])


class _WholeDocumentTokenizer:
    """Encodes each document as one token: not a character tokenizer."""

    def __init__(self, tokenizer):
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, documents, add_special_tokens):
        return {"input_ids": [[1] for _ in documents]}
