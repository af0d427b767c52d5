"""generate()'s default decoding loop for ssm_hub causal LMs (ssm_hub.generation): every step on the device,
captured as one CUDA graph on a GPU.

Every test compares the default call with transformers' own loop (``disable_compile=True``) on the same inputs and
seed, and checks from the log which loop ran. On CPU the decoder's step runs uncaptured, which checks its
bookkeeping (processors, sampling, EOS, padding, min length, early stop); the gpu-marked tests check the captured
graph and its reuse. Run: pytest tests/models/test_graph_decoding.py
"""

import logging

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    EosTokenCriteria,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteriaList,
    TopKLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from conftest import randomised, tiny_config

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
])]
FALLBACK = "runs transformers' decoding loop"
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3)


def build(kind: str, device: str):
    torch.manual_seed(0)
    config = tiny_config("ssm_hub_hybrid" if kind == "hybrid" else kind)
    return randomised(AutoModelForCausalLM.from_config(config)).to(device)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["ssm_hub_mamba", "ssm_hub_mamba2", "hybrid"])
def model(request, device):
    return build(request.param, device)


def _both(model, input_ids, caplog, seed: int = 0, **kwargs):
    """(transformers' loop, the default path) on the same inputs, settings and seed; checks which loop each ran."""
    with caplog.at_level(logging.INFO, logger="ssm_hub.generation"):
        caplog.clear()
        torch.manual_seed(seed)
        expected = model.generate(input_ids, disable_compile=True, **kwargs)
        assert f"{FALLBACK}: disable_compile=True" in caplog.text
        caplog.clear()
        torch.manual_seed(seed)
        got = model.generate(input_ids, **kwargs)
        assert FALLBACK not in caplog.text, caplog.text
    return expected, got


@pytest.mark.parametrize("settings", [dict(do_sample=False), SAMPLING], ids=["greedy", "sampling"])
def test_default_generate_matches_transformers_loop(model, device, settings, caplog):
    input_ids = torch.randint(1, 64, (3, 9), device=device)
    expected, got = _both(model, input_ids, caplog, max_new_tokens=40, pad_token_id=0, eos_token_id=None, **settings)
    assert got.shape == (3, 49)
    torch.testing.assert_close(got, expected)
    if settings["do_sample"]:  # the same seed draws the same tokens, and another seed others
        _, again = _both(model, input_ids, caplog, seed=1, max_new_tokens=40, pad_token_id=0, eos_token_id=None,
                         **settings)
        assert not torch.equal(again, got)


def test_single_new_token(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 5), device=device)
    expected, got = _both(model, input_ids, caplog, max_new_tokens=1, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, expected)


def test_eos_pads_finished_rows_and_stops_when_all_finish(model, device, caplog):
    input_ids = torch.randint(1, 64, (4, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=60, pad_token_id=0, eos_token_id=None)
    # An EOS that row 0 produces early: the row must be padded afterwards while the others go on.
    eos = int(free_run[0, 6 + 3])
    first_eos = int((free_run[0, 6:] == eos).nonzero()[0])
    expected, got = _both(model, input_ids, caplog, do_sample=False, max_new_tokens=60, pad_token_id=0,
                          eos_token_id=eos)
    assert (got[0, 6 + first_eos + 1 :] == 0).all()
    torch.testing.assert_close(got, expected)
    # Identical rows finish together: the output ends there, not at max_new_tokens.
    same_rows = input_ids[:1].expand(4, -1).contiguous()
    expected, got = _both(model, same_rows, caplog, do_sample=False, max_new_tokens=100, pad_token_id=0,
                          eos_token_id=eos)
    assert got.shape[1] == 6 + first_eos + 1
    torch.testing.assert_close(got, expected)


def test_min_new_tokens_forbids_eos(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    eos = int(free_run[0, 6])  # row 0 would end at once
    expected, got = _both(model, input_ids, caplog, do_sample=False, max_new_tokens=12, min_new_tokens=5,
                          pad_token_id=0, eos_token_id=eos)
    assert got.shape[1] >= 6 + 5
    assert (got[0, 6 : 6 + 5] != eos).all()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("settings", [dict(do_sample=False), SAMPLING], ids=["greedy", "sampling"])
def test_left_padded_prompt(model, device, settings, caplog):
    input_ids = torch.randint(1, 64, (2, 8), device=device)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = 0, 0
    expected, got = _both(model, input_ids, caplog, attention_mask=attention_mask, max_new_tokens=10,
                          pad_token_id=0, eos_token_id=None, **settings)
    torch.testing.assert_close(got, expected)


def test_callers_own_eos_criteria_and_min_length_processors_count(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    common = dict(do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    # An EOS criterion of the caller's, with an id the config does not name: row 0 stops and is padded after it.
    stop = int(free_run[0, 6 + 4])
    first_stop = int((free_run[0, 6:] == stop).nonzero()[0])
    expected, got = _both(model, input_ids, caplog, stopping_criteria=StoppingCriteriaList([EosTokenCriteria(stop)]),
                          **common)
    assert (got[0, 6 + first_stop + 1:] == 0).all()
    torch.testing.assert_close(got, expected)
    # A min-length processor of the caller's, with its own id: row 1's first token is held back for 3 tokens.
    early = int(free_run[1, 6])
    processor = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(6, 3, early, device=device)])
    expected, got = _both(model, input_ids, caplog, logits_processor=processor, **common)
    assert (got[:, 6:9] != early).all()
    torch.testing.assert_close(got, expected)


def test_prompt_given_as_embeddings(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 7), device=device)
    embeddings = model.get_input_embeddings()(input_ids).detach()
    expected, got = _both(model, None, caplog, inputs_embeds=embeddings, do_sample=False, max_new_tokens=8,
                          pad_token_id=0, eos_token_id=None)
    assert got.shape == (2, 8)  # the new tokens only, as transformers returns them for an embedded prompt
    torch.testing.assert_close(got, expected)
    from_ids = model.generate(input_ids, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, from_ids[:, 7:])


def test_consecutive_sampling_calls_draw_what_transformers_draws(model, device, caplog):
    """Rows that finish early must not leave extra draws behind: the next call, not reseeded, samples the same."""
    input_ids = torch.randint(1, 64, (2, 5), device=device)
    settings = dict(max_new_tokens=30, pad_token_id=0, eos_token_id=[3, 7, 11], **SAMPLING)
    runs = []
    for eager in (True, False):
        torch.manual_seed(0)
        runs.append([model.generate(input_ids, disable_compile=eager, **settings) for _ in range(3)])
    for expected, got in zip(*runs):
        torch.testing.assert_close(got, expected)


def test_eos_ids_outside_the_vocabulary_never_match(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 5), device=device)
    for eos in (-1, 100, [100, -1]):
        expected, got = _both(model, input_ids, caplog, do_sample=False, max_new_tokens=12, pad_token_id=0,
                              eos_token_id=eos)
        assert got.shape == (2, 17)
        torch.testing.assert_close(got, expected)


def test_chunked_prefill_matches_and_is_not_compiled(model, device, caplog, monkeypatch):
    configs = []
    prefill = type(model)._prefill

    def recording_prefill(self, input_ids, generation_config, *args, **kwargs):
        configs.append(generation_config.disable_compile)
        return prefill(self, input_ids, generation_config, *args, **kwargs)

    monkeypatch.setattr(type(model), "_prefill", recording_prefill)
    input_ids = torch.randint(1, 64, (2, 13), device=device)
    expected, got = _both(model, input_ids, caplog, do_sample=False, max_new_tokens=6, pad_token_id=0,
                          eos_token_id=None, prefill_chunk_size=4)
    torch.testing.assert_close(got, expected)
    assert configs[-1] is True  # the decoder's static cache must not switch on transformers' compiled prefill


def test_inference_mode_then_plain_calls(model, device, caplog):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    settings = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        inside = model.generate(input_ids, **settings)
    expected, got = _both(model, input_ids, caplog, **settings)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(inside, expected)


def test_callers_processors_are_left_as_they_are(caplog):
    from transformers import RepetitionPenaltyLogitsProcessor

    model = build("ssm_hub_mamba2", "cpu")
    input_ids = torch.randint(1, 64, (2, 6))
    settings = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    first = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([2, 5]))
    model.generate(input_ids, logits_processor=LogitsProcessorList([first]), **settings)
    second = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 1]))
    expected, got = _both(model, input_ids, caplog, logits_processor=LogitsProcessorList([second]), **settings)
    torch.testing.assert_close(got, expected)
    assert first.prompt_ignore_length.tolist() == [2, 5] and second.prompt_ignore_length.tolist() == [0, 1]


class _Collector(BaseStreamer):
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value)

    def end(self):
        pass


@pytest.mark.parametrize("kind,settings,reason", [
    ("ssm_hub_mamba2", dict(streamer=_Collector()), "a streamer"),
    ("ssm_hub_mamba2", dict(return_dict_in_generate=True), "return_dict_in_generate=True"),
    ("ssm_hub_mamba2", dict(no_repeat_ngram_size=2), "NoRepeatNGramLogitsProcessor"),
    ("ssm_hub_mamba2", dict(max_time=60.0), "MaxTimeCriteria"),
    ("ssm_hub_mamba2", dict(use_cache=False), "use_cache=False"),
    ("ssm_hub_mamba2", dict(cache_implementation="offloaded"), "cache_implementation='offloaded'"),
    ("hybrid", dict(cache=True), "a cache was passed in"),
    ("ssm_hub_mamba", dict(logits_processor=LogitsProcessorList([
        TopKLogitsWarper(5), MinNewTokensLengthLogitsProcessor(6, 3, 7)])), "a min-length processor after a top-k"),
    ("sliding", {}, "sliding-window attention layers"),
])
def test_what_the_decoder_cannot_capture_runs_transformers_loop_and_says_why(kind, settings, reason, caplog):
    if kind == "sliding":
        torch.manual_seed(0)
        model = randomised(AutoModelForCausalLM.from_config(tiny_config(
            "ssm_hub_hybrid", mixer_types=["mamba2", "sliding_attention", "mamba"], sliding_window=4)))
    else:
        model = build(kind, "cpu")
    input_ids = torch.randint(1, 64, (2, 6))
    common = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    if settings.get("cache"):
        settings = dict(cache=DynamicCache(config=model.config))
    with caplog.at_level(logging.INFO, logger="ssm_hub.generation"):
        got = model.generate(input_ids, **settings, **common)
    assert f"{FALLBACK}: " in caplog.text and reason in caplog.text, caplog.text
    if settings.get("cache") is not None:
        settings = dict(cache=DynamicCache(config=model.config))
    expected = model.generate(input_ids, disable_compile=True, **settings, **common)
    if settings.get("return_dict_in_generate"):
        got, expected = got.sequences, expected.sequences
    torch.testing.assert_close(got, expected)


def test_beam_search_stays_transformers_own(caplog):
    model = build("ssm_hub_mamba2", "cpu")
    with caplog.at_level(logging.INFO, logger="ssm_hub.generation"):
        out = model.generate(torch.randint(1, 64, (1, 5)), num_beams=3, max_new_tokens=6, pad_token_id=0,
                             eos_token_id=None)
    assert out.shape == (1, 11) and "ssm_hub.generation" not in caplog.text


def _decoders():
    from ssm_hub.generation import _DECODERS

    return _DECODERS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["ssm_hub_mamba2", "hybrid"])
def test_graph_is_captured_once_and_replayed_across_calls(kind, caplog):
    model = build(kind, "cuda")
    input_ids = torch.randint(1, 64, (2, 6), device="cuda")
    common = dict(pad_token_id=0, do_sample=False)
    expected, got = _both(model, input_ids, caplog, max_new_tokens=40, eos_token_id=None, **common)
    torch.testing.assert_close(got, expected)
    assert "captured" in caplog.text
    graph = _decoders()[model].graph
    assert graph is not None
    eos = int(expected[1, 6 + 2])
    # Other budgets, stops and prompt lengths in the same cache-length bucket replay the same graph.
    for settings in (dict(max_new_tokens=30, eos_token_id=eos), dict(max_new_tokens=35, min_new_tokens=10,
                                                                       eos_token_id=eos)):
        for prompt in (input_ids, input_ids[:, 2:]):
            expected, got = _both(model, prompt, caplog, **settings, **common)
            torch.testing.assert_close(got, expected)
            assert _decoders()[model].graph is graph and "captured" not in caplog.text
    # Merging a LoRA adapter writes into the base weights in place: the old graph (which still runs the adapter)
    # must not be replayed.
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    expected, got = _both(lora, input_ids, caplog, max_new_tokens=12, eos_token_id=None, **common)
    torch.testing.assert_close(got, expected)
    lora.merge_adapter()
    expected, got = _both(lora, input_ids, caplog, max_new_tokens=12, eos_token_id=None, **common)
    torch.testing.assert_close(got, expected)
    assert "captured" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_sampling_at_every_batch_size_on_the_graph(batch_size, caplog):
    model = build("hybrid", "cuda")
    input_ids = torch.randint(1, 64, (batch_size, 5), device="cuda")
    expected, got = _both(model, input_ids, caplog, max_new_tokens=24, pad_token_id=0, eos_token_id=3, **SAMPLING)
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_that_waits_for_the_host_runs_uncaptured(caplog):
    model = build("ssm_hub_mamba2", "cuda")
    # A hook that reads a value on the host cannot be captured; the decoder says so and still decodes.
    def read_on_the_host(module, args, output):
        output.sum().item()

    model.lm_head.register_forward_hook(read_on_the_host)
    input_ids = torch.randint(1, 64, (2, 6), device="cuda")
    expected, got = _both(model, input_ids, caplog, do_sample=False, max_new_tokens=12, pad_token_id=0,
                          eos_token_id=None)
    torch.testing.assert_close(got, expected)
    assert "could not be captured" in caplog.text
    assert _decoders()[model].graph is None
    # The failed capture left the device's random numbers usable (it used to leave the generator in capture mode).
    torch.randn(4, device="cuda")
    sampled = model.generate(input_ids, do_sample=True, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (2, 10)


def test_model_key_sees_what_changes_the_step_without_moving_weights():
    from peft import LoraConfig, get_peft_model

    from ssm_hub.generation import _model_key

    model = randomised(AutoModelForCausalLM.from_config(tiny_config("ssm_hub_mamba2")))
    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    keys = [_model_key(model)]
    lora.merge_adapter()  # in place: no address changes
    keys.append(_model_key(model))
    lora.unmerge_adapter()
    with lora.disable_adapter():
        keys.append(_model_key(model))
    model.train()
    keys.append(_model_key(model))
    model.eval()
    handle = model.lm_head.register_forward_hook(lambda module, args, output: -output)
    keys.append(_model_key(model))  # a hook added after a capture changes what a step computes
    handle.remove()
    with torch.inference_mode():
        keys.append(_model_key(model))
    assert len(set(keys)) == len(keys)
    assert _model_key(model) == keys[0]  # and back to the first mode, the first key
