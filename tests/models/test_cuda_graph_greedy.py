"""ssm_hub.cuda_graph_greedy, generate's custom_generate loop that replays each decode step as a CUDA graph.

On CPU the same step runs eagerly, which checks the bookkeeping (EOS, padding, min length, early stop) against
transformers' own greedy search; the gpu-marked tests check the captured graph. Run: pytest tests/models -k graph
"""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    EosTokenCriteria,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    StaticCache,
    StoppingCriteriaList,
)

import ssm_hub
from conftest import randomised, tiny_config

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def model(model_type, device):
    return randomised(AutoModelForCausalLM.from_config(tiny_config(model_type))).to(device)


def _both(model, input_ids, **kwargs):
    """(transformers' greedy search, cuda_graph_greedy) on the same inputs and settings."""
    kwargs = dict(do_sample=False, cache_implementation="static", **kwargs)
    expected = model.generate(input_ids, **kwargs)
    return expected, model.generate(input_ids, custom_generate=ssm_hub.cuda_graph_greedy, **kwargs)


def test_matches_greedy_generate(model, device):
    input_ids = torch.randint(1, 64, (3, 9), device=device)
    expected, got = _both(model, input_ids, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    assert got.shape == (3, 49)
    torch.testing.assert_close(got, expected)


def test_single_new_token(model, device):
    input_ids = torch.randint(1, 64, (2, 5), device=device)
    expected, got = _both(model, input_ids, max_new_tokens=1, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, expected)


def test_eos_pads_finished_rows_and_stops_when_all_finish(model, device):
    input_ids = torch.randint(1, 64, (4, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=60, pad_token_id=0, eos_token_id=None)
    # An EOS that row 0 produces early: the row must be padded afterwards while the others go on.
    eos = int(free_run[0, 6 + 3])
    first_eos = int((free_run[0, 6:] == eos).nonzero()[0])
    expected, got = _both(model, input_ids, max_new_tokens=60, pad_token_id=0, eos_token_id=eos)
    assert (got[0, 6 + first_eos + 1 :] == 0).all()
    torch.testing.assert_close(got, expected)
    # Identical rows finish together: the output ends there, not at max_new_tokens.
    same_rows = input_ids[:1].expand(4, -1).contiguous()
    expected, got = _both(model, same_rows, max_new_tokens=100, pad_token_id=0, eos_token_id=eos)
    assert got.shape[1] == 6 + first_eos + 1
    torch.testing.assert_close(got, expected)


def test_min_new_tokens_forbids_eos(model, device):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    eos = int(free_run[0, 6])  # row 0 would end at once
    expected, got = _both(model, input_ids, max_new_tokens=12, min_new_tokens=5, pad_token_id=0, eos_token_id=eos)
    assert got.shape[1] >= 6 + 5
    assert (got[0, 6 : 6 + 5] != eos).all()
    torch.testing.assert_close(got, expected)


def test_left_padded_prompt(model, device):
    input_ids = torch.randint(1, 64, (2, 8), device=device)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = 0, 0
    expected, got = _both(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None
    )
    torch.testing.assert_close(got, expected)


def test_callers_own_eos_criteria_and_min_length_processors_count(model, device):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    common = dict(max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    # An EOS criterion of the caller's, with an id the config does not name: row 0 stops and is padded after it.
    stop = int(free_run[0, 6 + 4])
    first_stop = int((free_run[0, 6:] == stop).nonzero()[0])
    expected, got = _both(model, input_ids, stopping_criteria=StoppingCriteriaList([EosTokenCriteria(stop)]), **common)
    assert (got[0, 6 + first_stop + 1:] == 0).all()
    torch.testing.assert_close(got, expected)
    # A min-length processor of the caller's, with its own id: row 1's first token is held back for 3 tokens.
    early = int(free_run[1, 6])
    processor = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(6, 3, early, device=device)])
    expected, got = _both(model, input_ids, logits_processor=processor, **common)
    assert (got[:, 6:9] != early).all()
    torch.testing.assert_close(got, expected)


def test_a_callers_cache_ends_where_transformers_leaves_it(model, device):
    input_ids = torch.randint(1, 64, (2, 6), device=device)
    free_run = model.generate(input_ids, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    eos = int(free_run[0, 6 + 2])
    same_rows = input_ids[:1].expand(2, -1).contiguous()  # both rows end at once, long before max_new_tokens
    caches = []
    for custom in (None, ssm_hub.cuda_graph_greedy):
        cache = StaticCache(config=model.config, max_cache_len=32)
        model.generate(same_rows, custom_generate=custom, cache=cache, do_sample=False, max_new_tokens=20,
                       pad_token_id=0, eos_token_id=eos)
        caches.append(cache)
    for mine, theirs in zip(caches[1].layers, caches[0].layers):
        torch.testing.assert_close(mine.recurrent_states[0], theirs.recurrent_states[0])
        torch.testing.assert_close(mine.conv_states[0], theirs.conv_states[0])


@pytest.mark.parametrize("model_type", ["ssm_hub_mamba2"])
def test_unsupported_settings_are_named(model):
    input_ids = torch.randint(1, 64, (1, 4), device=model.device)
    common = dict(custom_generate=ssm_hub.cuda_graph_greedy, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(input_ids, **common)
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor"):
        model.generate(input_ids, cache_implementation="static", repetition_penalty=1.3, **common)
    with pytest.raises(ValueError, match="greedy search only"):
        model.generate(input_ids, cache_implementation="static", do_sample=True, **common)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(input_ids, cache_implementation="static", return_dict_in_generate=True, **common)


def test_models_with_attention_layers_are_refused():
    config = ssm_hub.SsmHubHybridConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, mixer_types=["mamba2", "attention"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, mamba_d_state=8, mamba_d_head=8, mamba_n_groups=1,
        mamba_chunk_size=8,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="every layer must be an SSM layer"):
        model.generate(
            torch.randint(1, 64, (1, 4)), custom_generate=ssm_hub.cuda_graph_greedy, cache_implementation="static",
            max_new_tokens=3, pad_token_id=0, eos_token_id=None,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_is_reused_across_calls_with_new_settings():
    from ssm_hub.generation import _CAPTURED

    model = randomised(AutoModelForCausalLM.from_config(tiny_config("ssm_hub_mamba2"))).cuda()
    input_ids = torch.randint(1, 64, (2, 6), device="cuda")
    expected, got = _both(model, input_ids, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, expected)
    graph = _CAPTURED[model].graph
    eos = int(expected[1, 6 + 2])
    for settings in (dict(max_new_tokens=30, eos_token_id=eos), dict(max_new_tokens=35, min_new_tokens=10, eos_token_id=eos)):
        expected, got = _both(model, input_ids, pad_token_id=0, **settings)
        torch.testing.assert_close(got, expected)
        assert _CAPTURED[model].graph is graph  # replayed, not captured again
    # Merging a LoRA adapter writes into the base weights in place: the old graph (which still runs the adapter)
    # must not be replayed.
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    expected, got = _both(lora, input_ids, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, expected)
    lora.merge_adapter()
    expected, got = _both(lora, input_ids, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(got, expected)
    lora.unmerge_adapter()
    model = lora.unload()
    # A user's own cache ends holding the final states, as if the steps had run on it.
    cache = StaticCache(config=model.config, max_cache_len=64)
    model.generate(input_ids, custom_generate=ssm_hub.cuda_graph_greedy, cache=cache, max_new_tokens=20,
                   do_sample=False, pad_token_id=0, eos_token_id=None)
    reference = StaticCache(config=model.config, max_cache_len=64)
    model.generate(input_ids, cache=reference, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    for mine, theirs in zip(cache.layers, reference.layers):
        torch.testing.assert_close(mine.recurrent_states[0], theirs.recurrent_states[0])
        torch.testing.assert_close(mine.conv_states[0], theirs.conv_states[0])


def test_capture_key_sees_what_changes_the_step_without_moving_weights():
    from peft import LoraConfig, get_peft_model

    from ssm_hub.generation import _capture_key

    model = randomised(AutoModelForCausalLM.from_config(tiny_config("ssm_hub_mamba2")))
    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    keys = [_capture_key(model, [], 2)]
    lora.merge_adapter()  # in place: no address changes
    keys.append(_capture_key(model, [], 2))
    lora.unmerge_adapter()
    with lora.disable_adapter():
        keys.append(_capture_key(model, [], 2))
    model.train()
    keys.append(_capture_key(model, [], 2))
    assert len(set(keys)) == len(keys)
    model.eval()
    assert _capture_key(model, [], 2) == keys[0]  # and back to the first mode, the first key
