"""Training text: documents from local files, a datasets name or text that ships with Python, tokenized and packed
into fixed-length rows whose position_ids restart at every document.

Packing never lets one document's state leak into the next: ssm_hub's SSM layers reset their state where
position_ids restart (and the hybrids' attention layers build per-document masks from them), so a packed row
trains like its documents run one by one. The loss covers every token (a document's first token is predicted from
the end of the previous one, as in standard packing), except for ``data.builtin: mqar``, whose loss is on the
queried values alone (ssm_hub.training.mqar.answer_mask): the rows' ``labels`` are -100 elsewhere.
"""

import json
from pathlib import Path

import torch

from ssm_hub.progress import status
from ssm_hub.training.config import DataSection


def read_documents(data: DataSection) -> list[str]:
    """The documents of ``data``: .txt files split at blank lines, .json / .jsonl records' ``text_field``, a
    datasets split's ``text_field``, or the builtin text; empty documents dropped, at most ``max_documents``."""
    status(f"data: reading {_source(data)}")
    if data.builtin == "python_docs":
        from pydoc_data.topics import topics

        documents = [topics[key] for key in sorted(topics)]
    elif data.builtin == "mqar":
        from ssm_hub.training.mqar import BUILTIN_DOCUMENTS, mqar_documents

        documents = mqar_documents(data.max_documents or BUILTIN_DOCUMENTS)
    elif data.dataset is not None:
        import datasets

        rows = datasets.load_dataset(data.dataset, data.dataset_config, split=data.split)
        if data.text_field not in rows.column_names:
            raise ValueError(f"data.text_field {data.text_field!r} is not a column of {data.dataset} "
                             f"(columns: {rows.column_names})")
        documents = list(rows[data.text_field])
    else:
        documents = [document for path in data.files for document in _file_documents(Path(path), data.text_field)]
    documents = [document for document in documents if document and document.strip()]
    if data.max_documents is not None:
        documents = documents[: data.max_documents]
    if not documents:
        raise ValueError("the training data holds no non-empty document")
    status(f"data: {len(documents):,} documents, {sum(map(len, documents)):,} characters")
    return documents


def _source(data: DataSection) -> str:
    if data.builtin is not None:
        return f"{data.builtin} (builtin)"
    if data.dataset is not None:
        return f"the {data.split} split of {data.dataset}"
    files = [str(path) for path in data.files]
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def _file_documents(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"data.files: {path} is not a file")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8").split("\n\n")
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                          if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"data.files: {path} is not valid {path.suffix[1:].upper()}: {error}") from None
        if isinstance(records, dict):
            records = [records]
        bad = [i for i, record in enumerate(records)
               if not isinstance(record, dict) or not isinstance(record.get(text_field), str)]
        if bad:
            raise ValueError(f"data.files: records {bad[:5]} of {path} are not objects with a string "
                             f"{text_field!r} field (data.text_field)")
        return [record[text_field] for record in records]
    raise ValueError(f"data.files: {path} is neither .txt, .json nor .jsonl")


END_OF_TEXT = "<|endoftext|>"  # the one special token of the tokenizers built here: BOS, EOS and pad


def _with_end_of_text(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT)


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``documents`` in a few seconds (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return _with_end_of_text(tokenizer)


def character_tokenizer(documents: list[str]):
    """One token per character that ``documents`` hold (sorted; token 0 is the special token), as the usual
    character-level Shakespeare models have. A character the documents do not hold is an error when encoded, not
    silently replaced."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    characters = sorted(set("".join(documents)))
    if not characters:
        raise ValueError("tokenizer.characters: the training documents hold no character")
    vocabulary = {END_OF_TEXT: 0, **{character: index for index, character in enumerate(characters, start=1)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()  # joined back without separators
    return _with_end_of_text(tokenizer)


def pack(token_lists: list[list[int]], seq_len: int, eos_token_id: int | None,
         loss_masks: list[list[bool]] | None = None) -> dict[str, torch.Tensor]:
    """Concatenate the tokenized documents (each followed by ``eos_token_id`` when given) and cut rows of
    ``seq_len``: {"input_ids", "position_ids"} [rows, seq_len], positions counting from 0 in each document and in
    the part of a document that a row carries on (each row is a model call of its own, whose state starts empty;
    restarting there also keeps absolute positions, GPT-2's, below seq_len). The tail shorter than a row is
    dropped. ``loss_masks`` (one flag per token of each document) adds "labels": the input_ids where the flag is
    True, -100 elsewhere and at the end-of-text tokens."""
    if loss_masks is not None and [len(mask) for mask in loss_masks] != [len(tokens) for tokens in token_lists]:
        raise ValueError("pack: loss_masks must hold one flag per token of each document")
    ids, positions, counted = [], [], []
    for index, tokens in enumerate(token_lists):
        end = [eos_token_id] if eos_token_id is not None else []
        ids += list(tokens) + end
        positions += range(len(tokens) + len(end))
        if loss_masks is not None:
            counted += list(loss_masks[index]) + [False] * len(end)
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"the data holds {len(ids)} tokens, fewer than one row of data.seq_len = {seq_len}")
    ids = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    positions = torch.tensor(positions[: rows * seq_len]).view(rows, seq_len)
    carried_on = (positions == 0).cumsum(dim=1) == 0  # a row's tokens before its first document start
    positions = torch.where(carried_on, positions - positions[:, :1], positions)
    packed = {"input_ids": ids, "position_ids": positions}
    if loss_masks is not None:
        counted = torch.tensor(counted[: rows * seq_len]).view(rows, seq_len)
        packed["labels"] = torch.where(counted, ids, torch.full_like(ids, -100))
    return packed


class PackedDataset(torch.utils.data.Dataset):
    """Rows of :func:`pack`; each item has ``labels``: pack's, or else the input_ids (the models shift them)."""

    def __init__(self, packed: dict[str, torch.Tensor]):
        self.packed = packed

    def __len__(self) -> int:
        return self.packed["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = {name: tensor[index] for name, tensor in self.packed.items()}
        row.setdefault("labels", row["input_ids"])
        return row


def split_held_out(documents: list, eval_fraction: float) -> tuple[list, list]:
    """(kept for training, held out): the last ``eval_fraction`` of ``documents`` (texts or their token lists) are
    held out, at least one when the fraction is above 0 and there are two documents or more."""
    held_out = int(len(documents) * eval_fraction)
    if eval_fraction > 0 and held_out == 0:
        held_out = 1 if len(documents) > 1 else 0
    return documents[: len(documents) - held_out], documents[len(documents) - held_out:]


def tokenize_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """The token ids of each document, without special tokens. A vocabulary without an unknown token (the
    character-level tokenizer's: it knows the characters of the text it was built from) cannot encode a character
    it lacks; that is said by naming the characters, where the tokenizers library raises a bare Exception."""
    try:
        return tokenizer(documents, add_special_tokens=False)["input_ids"]
    except Exception as error:
        if "Missing [UNK]" not in str(error):
            raise
        vocabulary = tokenizer.get_vocab()
        unknown = sorted({character for document in documents for character in document} - set(vocabulary))
        raise ValueError(f"the tokenizer has no token for {len(unknown)} character(s) of the data, {unknown[:20]!r}, "
                         "and no unknown token: a character-level tokenizer knows only the characters of the text "
                         "it was built from; use data made of those characters, or a tokenizer built on this data"
                         ) from None


def train_and_eval_datasets(documents: list[str], tokenizer, data: DataSection):
    """(train, eval or None) packed datasets; the eval documents are the last ``eval_fraction`` of them
    (:func:`split_held_out`)."""
    status(f"data: tokenizing {len(documents):,} documents and packing them into rows of {data.seq_len} tokens")
    token_lists = tokenize_documents(tokenizer, documents)
    masks = _loss_masks(documents, token_lists) if data.builtin == "mqar" else None
    train_tokens, eval_tokens = split_held_out(token_lists, data.eval_fraction)
    train_masks, eval_masks = split_held_out(masks, data.eval_fraction) if masks else (None, None)
    train = PackedDataset(pack(train_tokens, data.seq_len, tokenizer.eos_token_id, train_masks))
    packed = (f"data: {len(train_tokens):,} documents ({sum(map(len, train_tokens)):,} tokens) packed into "
              f"{len(train):,} training rows of {data.seq_len} tokens")
    if not eval_tokens:
        status(packed)
        return train, None
    try:
        evaluation = PackedDataset(pack(eval_tokens, data.seq_len, tokenizer.eos_token_id, eval_masks))
    except ValueError as error:
        raise ValueError(f"the held-out documents (the last data.eval_fraction = {data.eval_fraction} of them): "
                         f"{error}; raise eval_fraction or set it to 0") from None
    status(f"{packed}; {len(eval_tokens):,} held out, {len(evaluation):,} rows")
    return train, evaluation


def _loss_masks(documents: list[str], token_lists: list[list[int]]) -> list[list[bool]]:
    """The MQAR documents' answer masks (ssm_hub.training.mqar.answer_mask), which need one token per character."""
    from ssm_hub.training.mqar import answer_mask

    if any(len(tokens) != len(document) for tokens, document in zip(token_lists, documents)):
        raise ValueError("data.builtin: mqar puts the loss on the queried values, which needs one token per "
                         "character: set tokenizer.characters: true")
    return [answer_mask(document) for document in documents]
