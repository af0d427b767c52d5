"""An attention_mask covers the cached tokens and the current ones, as in transformers; one of another length raises,
naming both lengths, in forward (every model type, with and without a cache) and in generate, where a longer mask was
once cut from the left without a word. The lengths transformers' own decoding loops pass keep working.

    python -P -m pytest -q tests/models/test_attention_mask_length.py
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from conftest import WITH_ATTENTION, tiny_config

INPUT_IDS = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def padded_mask(length: int) -> torch.Tensor:
    """A [2, length] mask whose first row is left-padded (an all-ones mask generate would drop as needless)."""
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3] = 0
    return mask


@pytest.fixture
def model(causal_lm_type):
    return AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).eval()


@pytest.mark.parametrize("length", [12, 6])
def test_a_mask_of_another_length_than_the_input_raises_naming_both(model, length):
    for use_cache in (False, True):
        with pytest.raises(ValueError, match=f"attention_mask covers {length} positions but the input has 9 tokens"):
            model(INPUT_IDS, attention_mask=padded_mask(length), use_cache=use_cache)
    with pytest.raises(ValueError, match=f"covers {length} positions but the input has 9 tokens"):
        model(INPUT_IDS, attention_mask=padded_mask(length), labels=INPUT_IDS, use_cache=False)


@pytest.mark.parametrize("length", [12, 6])
@pytest.mark.parametrize("decoding", [{}, {"disable_compile": True}, {"num_beams": 2}])
def test_generate_refuses_a_mask_of_another_length_than_the_prompt(model, length, decoding):
    with pytest.raises(ValueError, match=f"attention_mask covers {length} positions but the input has 9 tokens"):
        model.generate(INPUT_IDS, attention_mask=padded_mask(length), max_new_tokens=3, do_sample=False,
                       pad_token_id=0, **decoding)


def test_a_continuation_takes_the_mask_of_the_cached_and_the_current_tokens(model, causal_lm_type):
    """transformers' convention, which generate follows at every step: past + current positions."""
    mask = padded_mask(9)
    prefill = model(INPUT_IDS[:, :6], attention_mask=mask[:, :6])
    continued = model(INPUT_IDS[:, 6:], attention_mask=mask, cache=prefill.cache).logits
    whole = model(INPUT_IDS, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(continued, whole[:, 6:], rtol=1e-4, atol=1e-5)
    if causal_lm_type in WITH_ATTENTION:
        # The attention layers count the cached tokens: a mask of the current tokens alone would hide the wrong keys.
        prefill = model(INPUT_IDS[:, :6], attention_mask=mask[:, :6])
        with pytest.raises(ValueError, match="covers 3 positions but the input has 3 tokens after 6 cached tokens"):
            model(INPUT_IDS[:, 6:], attention_mask=mask[:, 6:], cache=prefill.cache)
    prefill = model(INPUT_IDS[:, :6], attention_mask=mask[:, :6])
    with pytest.raises(ValueError, match="covers 2 positions"):
        model(INPUT_IDS[:, 6:], attention_mask=mask[:, 7:], cache=prefill.cache)


def test_a_fresh_cache_takes_the_mask_of_the_input_alone(model):
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="covers 12 positions but the input has 9 tokens and no cached tokens"):
        model(INPUT_IDS, attention_mask=padded_mask(12), cache=cache)


def test_a_static_cache_takes_a_mask_as_long_as_the_cache(model):
    """ssm_hub's decoder passes the prompt's mask followed by ones up to the static cache's length at every step."""
    cache = StaticCache(config=model.config, max_cache_len=16)
    mask = torch.cat([padded_mask(9), torch.ones(2, 7, dtype=torch.long)], dim=1)
    model(INPUT_IDS, attention_mask=mask[:, :9], cache=cache)
    step = model(INPUT_IDS[:, -1:], attention_mask=mask, cache=cache, position_ids=torch.full((2, 1), 9))
    assert step.logits.shape == (2, 1, 64)


@pytest.mark.parametrize("decoding", [{}, {"disable_compile": True}, {"num_beams": 2}])
def test_generate_with_a_padded_prompt_still_runs(model, decoding):
    out = model.generate(INPUT_IDS, attention_mask=padded_mask(9), max_new_tokens=3, do_sample=False, pad_token_id=0,
                         **decoding)
    assert out.shape == (2, 12)
