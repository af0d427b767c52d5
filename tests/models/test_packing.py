"""Packed sequences: the state resets at document boundaries, however the boundaries are given, and attention layers
stay inside each document: in train and eval, with and without a cache, for every attention implementation, and in
a Trainer evaluation."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from conftest import CAUSAL_LM_TYPES, WITH_ATTENTION, tiny_config

LENGTHS = (5, 9, 3)
# (train mode, use_cache): eval with its default cache (on), eval without, training, training with a cache.
MODES = {"eval": (False, None), "eval without cache": (False, False), "train": (True, None),
         "train with cache": (True, True)}
# Each causal-LM model type with every attention implementation it supports on CPU (None: it has no attention).
IMPLEMENTATIONS = [(model_type, implementation) for model_type in CAUSAL_LM_TYPES
                   for implementation in (("eager", "sdpa") if model_type in WITH_ATTENTION else (None,))]


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


def _flattened(docs) -> dict:
    """The batch transformers' DataCollatorWithFlattening makes of ``docs``, with every boundary key it can give."""
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": doc.tolist()} for doc in docs])
    return {name: torch.as_tensor(value) for name, value in batch.items()}


def _packed_inputs(docs, boundaries: str) -> dict:
    if boundaries == "position_ids":
        return {"input_ids": torch.cat(docs)[None],
                "position_ids": torch.cat([torch.arange(len(doc)) for doc in docs])[None]}
    return _flattened(docs)


@pytest.mark.parametrize("model_type, attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("boundaries", ["position_ids", "flattening collator"])
@pytest.mark.parametrize("mode", MODES)
def test_a_packed_row_gives_each_documents_own_logits(model_type, attn_implementation, boundaries, mode):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn_implementation)
    docs = _documents()
    with torch.no_grad():
        expected = _separate_logits(model.eval(), docs)
    training, use_cache = MODES[mode]
    model.train(training)
    inputs = _packed_inputs(docs, boundaries)
    out = model(**inputs, use_cache=use_cache)
    torch.testing.assert_close(out.logits[0], expected, atol=1e-5, rtol=1e-4)
    leaked = model(inputs["input_ids"], use_cache=use_cache).logits[0]
    assert not torch.allclose(leaked[LENGTHS[0]:], expected[LENGTHS[0]:], atol=1e-3), "the test must see the leak"


def test_the_cache_after_a_packed_prefill_holds_the_last_documents_state(causal_lm_type):
    # What transformers' SSM caches hold after a packed row: the state the scan ends in, that of the last document.
    model = AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).eval()
    docs = [torch.randint(1, 64, (n,)) for n in (7, 2)]  # the last shorter than the conv window
    with torch.no_grad():
        packed = model(**_packed_inputs(docs, "position_ids")).cache
        alone = model(docs[-1][None]).cache
    ssm_layers = [index for index, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    for index in ssm_layers:
        torch.testing.assert_close(packed.layers[index].conv_states[0], alone.layers[index].conv_states[0])
        torch.testing.assert_close(packed.layers[index].recurrent_states[0], alone.layers[index].recurrent_states[0])


# Trainer sets the model's config.use_cache from its arguments (default False); with True, evaluation runs with a cache.
@pytest.mark.parametrize("use_cache", [False, True], ids=["default arguments", "use_cache"])
def test_trainer_evaluation_on_packed_documents_gives_their_unpacked_loss(causal_lm_type, use_cache, tmp_path):
    # Equal lengths, so that the unpacked batch needs no padding and both losses average over the same tokens.
    model = AutoModelForCausalLM.from_config(tiny_config(causal_lm_type))
    docs = [torch.randint(1, 64, (8,)).tolist() for _ in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=len(docs), report_to=[],
                             use_cpu=True, use_cache=use_cache)
    flattening = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    packed = Trainer(model=model, args=args, data_collator=flattening,
                     eval_dataset=[{"input_ids": doc} for doc in docs]).evaluate()
    unpacked = Trainer(model=model, args=args, data_collator=default_data_collator,
                       eval_dataset=[{"input_ids": doc, "labels": doc} for doc in docs]).evaluate()
    assert abs(packed["eval_loss"] - unpacked["eval_loss"]) <= 1e-5, (packed["eval_loss"], unpacked["eval_loss"])


def test_packing_keys_given_as_lists_work_as_tensors(causal_lm_type):
    """A collator without return_tensors="pt" (or a hand-written batch) gives Python lists."""
    model = AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).eval()
    docs = _documents()
    packed = torch.cat(docs)[None]
    expected = _separate_logits(model, docs)
    positions = [[position for n in LENGTHS for position in range(n)]]
    seq_idx = [[document for document, n in enumerate(LENGTHS) for _ in range(n)]]
    for kwargs in ({"cu_seqlens": [0, 5, 14, 17]}, {"cu_seq_lens_q": (0, 5, 14, 17)}, {"seq_idx": seq_idx},
                   {"position_ids": positions}):
        got = model(packed, use_cache=False, **kwargs).logits[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=str(kwargs))


@pytest.mark.parametrize("name, value, message", [
    ("cu_seqlens", [0, 5.5, 17], "cu_seqlens must hold whole numbers"),
    ("seq_idx", [[0, 0], [1]], "seq_idx must be a tensor or a list of whole numbers"),
    ("position_ids", "0 1 2", "position_ids must be a tensor or a list of whole numbers"),
])
def test_packing_keys_that_are_no_whole_numbers_are_refused_by_name(causal_lm_type, name, value, message):
    model = AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randint(1, 64, (1, 17)), use_cache=False, **{name: value})
