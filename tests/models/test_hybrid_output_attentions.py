"""``output_attentions=True`` on the hybrid: every head class returns ``attentions``, one tensor of attention
probabilities per attention layer (none for the SSM layers, as transformers' Jamba and Bamba), computed on the eager
path whatever the attention implementation, equal to probabilities recomputed by hand from the layer's own
projections with causal, padding, sliding-window and document masks; in the tuple of ``return_dict=False`` at
transformers' place; through a cache, packed rows and ``generate``; and without the flag the default path runs as
before (no eager attention, no extra output)."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, StaticCache

import ssm_hub
import ssm_hub.layers.attention as attention_module
from conftest import tiny_config
from ssm_hub.layers.rope import apply_rotary
from test_hybrid_model import full_attention, tiny

HEAD_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4, 2, 16, 5  # tiny(): hidden 64, 4 heads of 16, 2 key/value heads, window 5


def left_padded_batch(length: int = 9, padding: int = 3):
    input_ids = torch.randint(1, 97, (2, length))
    mask = torch.ones_like(input_ids)
    mask[1, :padding] = 0
    input_ids[1, :padding] = 0
    return input_ids, mask


def attention_inputs(model):
    """Record what each attention layer is called with: {layer index: (normed input, position_embeddings)}."""
    seen, handles = {}, []
    for index, block in enumerate(model.base_model.layers):
        if hasattr(block, "self_attn"):
            def record(module, args, kwargs, index=index):
                seen[index] = (args[0], kwargs["position_embeddings"])
            handles.append(block.self_attn.register_forward_pre_hook(record, with_kwargs=True))
    return seen, handles


def probabilities_by_hand(layer, hidden, position_embeddings, key_mask, window=None):
    """softmax(q k^T / sqrt(d)) over the keys a query may see: not after it, not padding, within ``window``."""
    batch, length, _ = hidden.shape
    query = layer.q_proj(hidden).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    key = layer.k_proj(hidden).view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    query, key = apply_rotary(query, key, *position_embeddings)
    key = key.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = query @ key.transpose(-1, -2) / HEAD_DIM ** 0.5
    positions = torch.arange(length)
    allowed = positions[None, :] <= positions[:, None]
    if window is not None:
        allowed &= positions[:, None] - positions[None, :] < window
    allowed = allowed[None, None] & key_mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("auto_class", HEAD_CLASSES, ids=lambda cls: cls.__name__)
def test_each_attention_layer_returns_its_probabilities(auto_class, implementation):
    model = auto_class.from_config(tiny(), attn_implementation=implementation).eval()
    input_ids, mask = left_padded_batch()
    seen, handles = attention_inputs(model)
    with torch.no_grad():
        output = model(input_ids, attention_mask=mask, output_attentions=True)
    for handle in handles:
        handle.remove()
    # Layers 1 (attention) and 3 (sliding_attention) of five; the Mamba layers have none.
    assert sorted(seen) == [1, 3] and len(output.attentions) == 2
    valid_queries = mask.bool()
    for probabilities, index in zip(output.attentions, sorted(seen)):
        assert probabilities.shape == (2, HEADS, 9, 9)
        layer = model.base_model.layers[index].self_attn
        expected = probabilities_by_hand(layer, *seen[index], mask, window=layer.sliding_window)
        torch.testing.assert_close(probabilities.transpose(1, 2)[valid_queries],
                                   expected.transpose(1, 2)[valid_queries], rtol=1e-5, atol=1e-6)


def test_without_the_flag_the_default_path_runs_as_before(monkeypatch):
    calls = []

    def counting_eager_attention(*args, **kwargs):
        calls.append(1)
        return eager_attention(*args, **kwargs)

    eager_attention = attention_module.eager_attention
    monkeypatch.setattr(attention_module, "eager_attention", counting_eager_attention)
    model = AutoModelForCausalLM.from_config(tiny()).eval()
    assert model.config._attn_implementation == "sdpa"
    input_ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = model(input_ids, attention_mask=mask)
        plain_tuple = model(input_ids, attention_mask=mask, return_dict=False)
        assert calls == [] and plain.attentions is None and len(plain_tuple) == 2  # logits, cache
        with_probabilities = model(input_ids, attention_mask=mask, output_attentions=True)
    assert len(calls) == 2  # one eager call per attention layer, only when asked
    valid = mask.bool()
    torch.testing.assert_close(with_probabilities.logits[valid], plain.logits[valid], rtol=1e-5, atol=1e-5)


def test_return_dict_false_keeps_transformers_field_order():
    model = AutoModelForCausalLM.from_config(tiny()).eval()
    input_ids, mask = left_padded_batch()
    flags = dict(attention_mask=mask, labels=input_ids, output_hidden_states=True, output_attentions=True,
                 output_router_logits=True)
    with torch.no_grad():
        as_dict = model(input_ids, **flags)
        as_tuple = model(input_ids, return_dict=False, **flags)
    # loss, aux_loss, logits, cache, hidden_states, attentions, router_logits (transformers' MoE causal LM order)
    assert len(as_tuple) == 7
    for position, name in enumerate(("loss", "aux_loss", "logits")):
        torch.testing.assert_close(as_tuple[position], getattr(as_dict, name))
    assert [t.shape for t in as_tuple[5]] == [t.shape for t in as_dict.attentions] == [(2, HEADS, 9, 9)] * 2
    assert [t.shape for t in as_tuple[6]] == [t.shape for t in as_dict.router_logits] == [(18, 4)] * 2
    for ours, theirs in zip(as_tuple[5], as_dict.attentions):
        torch.testing.assert_close(ours, theirs)
    base = AutoModel.from_config(tiny()).eval()
    with torch.no_grad():
        base_tuple = base(input_ids, attention_mask=mask, output_attentions=True, return_dict=False)
    assert len(base_tuple) == 3 and len(base_tuple[2]) == 2  # last_hidden_state, cache, attentions


def test_config_output_attentions_and_gradients_reach_the_probabilities():
    model = AutoModelForCausalLM.from_config(tiny(), attn_implementation="eager")
    model.config.output_attentions = True
    output = model(torch.randint(1, 97, (2, 7)))
    assert len(output.attentions) == 2
    output.attentions[0].retain_grad()
    output.logits.sum().backward()
    assert output.attentions[0].grad is not None and output.attentions[0].grad.abs().sum() > 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_steps_return_probabilities_over_the_cache(cache):
    model = AutoModelForCausalLM.from_config(full_attention()).eval()
    input_ids, mask = left_padded_batch(length=8)
    kwargs = {"cache": StaticCache(config=model.config, max_cache_len=12)} if cache == "static" else {}
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
        prefill = model(input_ids[:, :7], attention_mask=mask[:, :7], output_attentions=True, **kwargs)
        step = model(input_ids[:, 7:], attention_mask=mask, cache=prefill.cache, output_attentions=True).attentions
    for decoded, whole in zip(step, full):
        keys = decoded.shape[-1]
        assert decoded.shape[:3] == (2, HEADS, 1) and keys >= 8
        torch.testing.assert_close(decoded[..., :8], whole[:, :, 7:], rtol=1e-5, atol=1e-6)
        assert not decoded[..., 8:].any()  # a static cache's empty slots


def test_packed_documents_do_not_attend_to_each_other():
    model = AutoModelForCausalLM.from_config(full_attention()).eval()
    first, second = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 9))
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(torch.cat([first, second], dim=1), position_ids=position_ids, output_attentions=True)
        alone = [model(document, output_attentions=True).attentions for document in (first, second)]
    for layer, probabilities in enumerate(packed.attentions):
        torch.testing.assert_close(probabilities[..., :7, :7], alone[0][layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probabilities[..., 7:, 7:], alone[1][layer], rtol=1e-5, atol=1e-6)
        assert not probabilities[..., 7:, :7].any() and not probabilities[..., :7, 7:].any()


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_returns_each_steps_attentions(cache_implementation):
    model = AutoModelForCausalLM.from_config(full_attention()).eval()
    prompt, mask = left_padded_batch(length=6, padding=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                  cache_implementation=cache_implementation)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
        out = model.generate(prompt, output_attentions=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert len(out.attentions) == 3 and all(len(step) == 2 for step in out.attentions)
    # Over the cache's keys: a static cache has slots for every token to come, which no real query weighs yet.
    prefill = out.attentions[0][0]
    assert prefill.shape[:3] == (2, HEADS, 6) and prefill.shape[3] >= 6
    assert not prefill.transpose(1, 2)[mask.bool()][..., 6:].any()
    assert all(step[0].shape[:3] == (2, HEADS, 1) for step in out.attentions[1:])
    # The padded row's decode steps give its two padding positions no weight.
    assert all(not step[0][1, :, :, :2].any() for step in out.attentions[1:])


def test_the_multimodal_backbone_returns_attentions():
    model = ssm_hub.SsmHubMultimodalModel(tiny_config("ssm_hub_multimodal")).eval()
    with torch.no_grad():
        output = model(torch.randint(1, 60, (2, 7)), output_attentions=True)
    assert len(output.attentions) == 1 and output.attentions[0].shape == (2, 4, 7, 7)


def test_a_mask_the_eager_path_cannot_read_is_refused():
    # Masks precomputed for flash attention are 2-D; the probabilities come from the eager path, which needs 4-D.
    model = AutoModelForCausalLM.from_config(full_attention()).eval()
    input_ids, mask = left_padded_batch()
    masks = {"full_attention": mask, "linear_attention": mask}
    with torch.no_grad(), pytest.raises(ValueError, match="computes the probabilities on the eager path"):
        model(input_ids, attention_mask=masks, output_attentions=True)
