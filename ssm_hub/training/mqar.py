"""Multi-query associative recall (MQAR, as in the Zoology benchmarks), written as text for the character-level
tokenizer (``tokenizer.characters: true``), so that recipes, ``ssm-hub distill`` and the evaluations take it as
they take any text: ``data.builtin: mqar`` (``--builtin mqar``).

A document holds ``pairs`` key-value pairs, then ``:``, then ``queries`` of those keys, each followed by its value:

    a3Qx7!b0 ... :Qxb0a3 ...

Keys are distinct letters, values are drawn from 20 digits and symbols. The pairs are random, so only the values
after the colon can be predicted, and only by recalling the pair: :func:`recall_accuracy` scores the greedy next
token there. A transformer of a few layers solves it near-perfectly; an SSM must hold every pair in its state.
Training on this text puts the loss on those values alone (:func:`answer_mask`, as the Zoology benchmarks do): with
the loss on every character, the random keys and values drown the recall signal, and a 4-layer transformer
stayed at chance recall for 5,000 steps (H100), while with the loss on the answers alone a plain training loop
recalled 99.8% of the values after 2,000 steps. That loop's attention spanned the documents of each packed row; with
per-document attention masks (what transformers builds from the rows' position_ids when the model makes no cache,
as under Trainer) the same teacher stayed at 0.15 recall, so the teacher recipe ``mqar_llama`` keeps the cache on.

    from ssm_hub.training.mqar import mqar_documents, recall_accuracy
    documents = mqar_documents(1000, pairs=32, queries=16, seed=1)
    accuracy = recall_accuracy(model, tokenizer, documents)
"""

import random
import string

import torch

KEYS = string.ascii_letters
VALUES = string.digits + "!#$%&*+=?@"
QUERY_MARK = ":"
PAIRS, QUERIES = 32, 16  # data.builtin: mqar's documents
BUILTIN_DOCUMENTS = 20000  # data.builtin: mqar without data.max_documents
BUILTIN_SEED = 0


def mqar_documents(count: int, pairs: int = PAIRS, queries: int = QUERIES, seed: int = BUILTIN_SEED) -> list[str]:
    """``count`` documents (module docstring), the same for the same arguments."""
    if not 1 <= pairs <= len(KEYS):
        raise ValueError(f"MQAR pairs must be in [1, {len(KEYS)}] (distinct letters as keys), got {pairs}")
    if not 1 <= queries <= pairs:
        raise ValueError(f"MQAR queries must be in [1, pairs = {pairs}], got {queries}")
    if count < 1:
        raise ValueError(f"MQAR count must be at least 1, got {count}")
    generator = random.Random(seed)
    documents = []
    for _ in range(count):
        keys = generator.sample(KEYS, pairs)
        values = [generator.choice(VALUES) for _ in keys]
        asked = generator.sample(range(pairs), queries)
        documents.append("".join(k + v for k, v in zip(keys, values)) + QUERY_MARK
                         + "".join(keys[i] + values[i] for i in asked))
    return documents


def answer_mask(document: str) -> list[bool]:
    """One flag per character of an MQAR ``document``: True at the queried values (the characters that carry the
    training loss), False elsewhere."""
    mark = document.find(QUERY_MARK)
    if mark < 0 or (len(document) - mark - 1) % 2:
        raise ValueError(f"not an MQAR document (pairs, {QUERY_MARK!r}, then key-value queries): {document[:40]!r}")
    return [index > mark and (index - mark) % 2 == 0 for index in range(len(document))]


@torch.no_grad()
def recall_accuracy(model, tokenizer, documents: list[str], batch_size: int = 64) -> float:
    """The fraction of the queried values that ``model``'s greedy next token gets right, each predicted from the
    document up to and including its key. ``tokenizer`` must give one token per character."""
    device = next(model.parameters()).device
    correct = total = 0
    for begin in range(0, len(documents), batch_size):
        batch = documents[begin:begin + batch_size]
        ids = [tokenizer(document, add_special_tokens=False).input_ids for document in batch]
        if any(len(row) != len(document) for row, document in zip(ids, batch)):
            raise ValueError("recall_accuracy needs one token per character (tokenizer.characters: true)")
        if len({(len(row), document.find(QUERY_MARK)) for row, document in zip(ids, batch)}) != 1:
            raise ValueError("recall_accuracy takes documents of one layout (the same pairs and queries)")
        input_ids = torch.tensor(ids, device=device)
        predicted = model(input_ids=input_ids).logits.argmax(-1)
        mark = batch[0].index(QUERY_MARK)
        value_positions = torch.arange(mark + 2, input_ids.shape[1], 2, device=device)
        correct += (predicted[:, value_positions - 1] == input_ids[:, value_positions]).sum().item()
        total += value_positions.numel() * len(batch)
    return correct / total
