"""Packed sequences: the state resets at document boundaries, however the boundaries are given."""

import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from conftest import tiny_config

LENGTHS = (5, 9, 3)


def _documents():
    return [torch.randint(1, 64, (n,)) for n in LENGTHS]


def _separate_logits(model, docs):
    return torch.cat([model(doc[None], use_cache=False).logits[0] for doc in docs])


def test_restarting_position_ids_reset_the_state(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    docs = _documents()
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    expected = _separate_logits(model, docs)
    got = model(packed, position_ids=position_ids, use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    leaked = model(packed, use_cache=False).logits[0]
    assert not torch.allclose(leaked[LENGTHS[0]:], expected[LENGTHS[0]:], atol=1e-3), "test must see the leak"


def test_cu_seqlens_and_seq_idx_reset_the_state(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    docs = _documents()
    packed = torch.cat(docs)[None]
    expected = _separate_logits(model, docs)
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None].int()
    for kwargs in ({"cu_seq_lens_q": cu_seqlens}, {"cu_seqlens": cu_seqlens}, {"seq_idx": seq_idx}):
        got = model(packed, use_cache=False, **kwargs).logits[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=str(kwargs))


def test_flattening_collator_batch_trains_like_separate_documents(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    docs = _documents()
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": doc.tolist()} for doc in docs])
    batch = {k: torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = model(**batch, use_cache=False)
    torch.testing.assert_close(out.logits[0], _separate_logits(model, docs), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out.loss)


def test_packed_rows_in_a_batch_of_two(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    docs = _documents()
    row0 = torch.cat(docs)
    row1 = torch.cat([docs[2], docs[0], docs[1]])
    positions0 = torch.cat([torch.arange(n) for n in LENGTHS])
    positions1 = torch.cat([torch.arange(n) for n in (LENGTHS[2], LENGTHS[0], LENGTHS[1])])
    out = model(torch.stack([row0, row1]), position_ids=torch.stack([positions0, positions1]), use_cache=False).logits
    torch.testing.assert_close(out[0], _separate_logits(model, docs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], _separate_logits(model, [docs[2], docs[0], docs[1]]), atol=1e-5, rtol=1e-4)
