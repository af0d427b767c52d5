"""Generation through transformers' own cache for every ssm_hub architecture, on both decoding paths: the default
(ssm_hub.generation's decoder) and transformers' own loop."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import LinearAttentionLayer

from conftest import tiny_config


GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture
def model(model_type):
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def _greedy_without_cache(model, input_ids, steps):
    tokens = input_ids
    for _ in range(steps):
        logits = model(tokens, use_cache=False).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_default_cache_is_transformers_dynamic_cache_of_linear_layers(model):
    out = model(torch.randint(1, 64, (2, 5)), use_cache=True)
    assert type(out.cache) is DynamicCache
    assert all(isinstance(layer, LinearAttentionLayer) for layer in out.cache.layers)
    assert len(out.cache.layers) == model.config.num_hidden_layers


def test_greedy_with_cache_equals_recomputing_without_cache(model, decoding):
    input_ids = torch.randint(1, 64, (2, 7))
    generated = model.generate(input_ids, max_new_tokens=8, **GREEDY, **decoding)
    torch.testing.assert_close(generated, _greedy_without_cache(model, input_ids, 8))


def test_cached_step_logits_match_full_forward(model):
    input_ids = torch.randint(1, 64, (2, 10))
    full = model(input_ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    prefix = model(input_ids[:, :6], cache=cache, use_cache=True).logits
    steps = [model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(6, 8)]
    chunk = model(input_ids[:, 8:], cache=cache, use_cache=True).logits  # multi-token continuation from a cache
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5, rtol=1e-4)


def test_sampling_and_beam_search_run(model, decoding):
    input_ids = torch.randint(1, 64, (2, 5))
    sampled = model.generate(input_ids, max_new_tokens=6, do_sample=True, top_k=10, pad_token_id=0, eos_token_id=None,
                             **decoding)
    assert sampled.shape == (2, 11)
    beams = model.generate(
        input_ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
        eos_token_id=None, **decoding,
    )
    assert beams.shape == (4, 11)


def test_left_padded_batch_gives_each_rows_tokens(model, decoding):
    rows = [torch.randint(1, 64, (1, 7)), torch.randint(1, 64, (1, 4))]
    alone = [model.generate(r, max_new_tokens=6, **GREEDY, **decoding)[:, r.shape[1]:] for r in rows]
    pad = torch.zeros(1, 3, dtype=torch.long)
    input_ids = torch.cat([rows[0], torch.cat([pad, rows[1]], dim=1)])
    attention_mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], dim=1)]).long()
    batched = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=6, **GREEDY, **decoding
    )[:, 7:]
    torch.testing.assert_close(batched, torch.cat(alone))


def test_static_cache_generation_matches_dynamic(model, decoding):
    input_ids = torch.randint(1, 64, (2, 6))
    dynamic = model.generate(input_ids, max_new_tokens=6, **GREEDY, **decoding)
    static = model.generate(
        input_ids, max_new_tokens=6, cache_implementation="static", **GREEDY, **decoding
    )
    torch.testing.assert_close(static, dynamic)
    cache = StaticCache(config=model.config, max_cache_len=32)
    model(input_ids, cache=cache, use_cache=True)
    assert all(isinstance(layer, LinearAttentionLayer) for layer in cache.layers)


def test_cache_passed_under_transformers_older_names(model):
    input_ids = torch.randint(1, 64, (1, 6))
    for name in ("past_key_values", "cache_params"):
        cache = DynamicCache(config=model.config)
        assert model(input_ids, **{name: cache}).cache is cache


def test_a_cache_not_built_from_the_config_is_refused_clearly(model):
    with pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        model.generate(torch.randint(1, 64, (1, 4)), cache=DynamicCache(), max_new_tokens=2)


def test_bf16_greedy_with_cache_equals_recomputing(model_type, decoding):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(torch.bfloat16).eval()
    input_ids = torch.randint(1, 64, (2, 7))
    generated = model.generate(input_ids, max_new_tokens=6, **GREEDY, **decoding)
    torch.testing.assert_close(generated, _greedy_without_cache(model, input_ids, 6))
