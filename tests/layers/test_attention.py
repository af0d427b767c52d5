"""Self-attention and rotary embedding against transformers' Llama / Mistral / Jamba / Bamba: weights load by name,
outputs match for eager and sdpa with masks from transformers' masking_utils (left padding, sliding window, packed
sequences), prefill + decode through a DynamicCache equals full recomputation, every rope_type gives Llama's cos and
sin (dynamic and longrope through the same sequence of lengths), and bad arguments are refused."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bamba.configuration_bamba import BambaConfig
from transformers.models.bamba.modeling_bamba import BambaRotaryEmbedding
from transformers.models.bamba.modeling_bamba import apply_rotary_pos_emb as bamba_apply_rotary
from transformers.models.jamba.configuration_jamba import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaAttention
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralAttention

from conftest import scaled_rope_parameters
from ssm_hub.layers.attention import SelfAttention
from ssm_hub.layers.rope import ROPE_TYPES, RotaryEmbedding, apply_rotary, rope_config

H, HEADS, KV_HEADS, D, THETA, WINDOW = 32, 4, 2, 8, 500.0, 3
# Scaled RoPE for a context of MAX_POSITIONS extended from ORIGINAL_POSITIONS: positions up to LONG cross both.
ORIGINAL_POSITIONS, MAX_POSITIONS, LONG = 8, 32, 48


def scaled_rope(rope_type: str, partial_rotary_factor: float = 1.0) -> dict:
    return scaled_rope_parameters(rope_type, D, ORIGINAL_POSITIONS, partial_rotary_factor, rope_theta=THETA)


def tiny_config(kind: str, implementation: str, rope_parameters: dict | None = None):
    common = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=D,
                  num_hidden_layers=1, intermediate_size=64, vocab_size=16, max_position_embeddings=MAX_POSITIONS,
                  rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": THETA})
    config = MistralConfig(sliding_window=WINDOW, **common) if kind == "sliding" else LlamaConfig(**common)
    config._attn_implementation = implementation
    return config


def pair(kind: str, implementation: str):
    """transformers' attention (random weights) and ours with the same weights; the config and the rotary."""
    config = tiny_config(kind, implementation)
    theirs = (MistralAttention if kind == "sliding" else LlamaAttention)(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.3)
    ours = SelfAttention(H, HEADS, KV_HEADS, head_dim=D, rope_parameters={"rope_type": "default", "rope_theta": THETA},
                         sliding_window=WINDOW if kind == "sliding" else None,
                         attn_implementation=implementation).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours, config


def make_mask(config, embeds, attention_mask, cache=None, position_ids=None):
    make = create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask
    return make(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids)


def left_padded_batch(length: int = 7):
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, :3] = 0
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
    return torch.randn(2, length, H), padding, position_ids


def test_rotary_matches_llamas_cos_sin_and_rotation():
    config = tiny_config("full", "eager")
    positions = torch.tensor([[0, 1, 2, 3, 4000], [5, 0, 70, 9, 123456]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = RotaryEmbedding(config)(torch.empty(0, dtype=dtype), positions)
        ref_cos, ref_sin = LlamaRotaryEmbedding(config)(torch.empty(0, dtype=dtype), positions)
        assert cos.dtype == sin.dtype == dtype and cos.shape == (2, 5, D)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
    q, k = torch.randn(2, HEADS, 5, D), torch.randn(2, KV_HEADS, 5, D)
    cos, sin = cos.float(), sin.float()
    for ours, ref in zip(apply_rotary(q, k, cos, sin), llama_apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_partial_rotary_matches_bamba():
    config = BambaConfig(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, mamba_n_heads=8,
                         mamba_d_head=8,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA})
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    positions = torch.arange(6)[None].expand(2, -1) * 7
    cos, sin = RotaryEmbedding(config)(torch.empty(0), positions)
    ref_cos, ref_sin = BambaRotaryEmbedding(config)(torch.empty(0), positions)
    assert cos.shape == (2, 6, D // 2)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    q, k = torch.randn(2, HEADS, 6, D), torch.randn(2, KV_HEADS, 6, D)
    ours, ref = apply_rotary(q, k, cos, sin), bamba_apply_rotary(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours[0][..., D // 2:], q[..., D // 2:], rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["full", "sliding"])
def test_left_padded_batch_matches_transformers(kind, implementation):
    theirs, ours, config = pair(kind, implementation)
    x, padding, position_ids = left_padded_batch()
    mask = make_mask(config, x, padding, position_ids=position_ids)
    cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    out = ours(x, ours.rotary_emb(x, position_ids), mask)
    ref, _ = theirs(x, cos_sin, mask)
    valid = padding.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    if kind == "sliding":  # the window changes the result, so the comparison above covers it
        full_mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=padding, cache=None)
        assert not torch.allclose(ours(x, cos_sin, full_mask)[valid], out[valid], atol=1e-3)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["full", "sliding"])
def test_prefill_then_decode_through_dynamic_cache_equals_recomputation(kind, implementation):
    theirs, ours, config = pair(kind, implementation)
    x, padding, position_ids = left_padded_batch(length=8)
    full_out = ours(x, ours.rotary_emb(x, position_ids), make_mask(config, x, padding, position_ids=position_ids))

    cache, their_cache = DynamicCache(config=config), DynamicCache(config=config)
    steps = ((slice(0, 6), 6), (slice(6, 7), 7), (slice(7, 8), 8))  # prefill 6, then two single-token decodes
    outs = []
    for span, seen in steps:
        chunk, pos = x[:, span], position_ids[:, span]
        mask = make_mask(config, chunk, padding[:, :seen], cache=cache, position_ids=pos)
        outs.append(ours(chunk, ours.rotary_emb(chunk, pos), mask, cache=cache))
        their_mask = make_mask(config, chunk, padding[:, :seen], cache=their_cache, position_ids=pos)
        ref, _ = theirs(chunk, LlamaRotaryEmbedding(config)(chunk, pos), their_mask, cache=their_cache)
        torch.testing.assert_close(outs[-1][:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length(0) == 8
    valid = padding.bool()
    torch.testing.assert_close(torch.cat(outs, dim=1)[valid], full_out[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_documents_equal_separate_runs(implementation):
    _, ours, config = pair("full", implementation)
    lengths = (3, 5, 2)
    docs = [torch.randn(1, n, H) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = create_causal_mask(config=config, inputs_embeds=packed, attention_mask=None, cache=None,
                              position_ids=position_ids)
    assert mask is not None  # transformers detected the packing from the restarting positions
    out = ours(packed, ours.rotary_emb(packed, position_ids), mask)
    separate = torch.cat([ours(doc, ours.rotary_emb(doc, torch.arange(doc.shape[1])[None]),
                               create_causal_mask(config=config, inputs_embeds=doc, attention_mask=None, cache=None))
                          for doc in docs], dim=1)
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-5)


def test_without_position_embeddings_rope_comes_from_position_ids_or_the_cache_length():
    _, ours, _ = pair("full", "sdpa")
    x = torch.randn(2, 5, H)
    positions = torch.arange(5)[None].expand(2, -1)
    expected = ours(x, ours.rotary_emb(x, positions))
    torch.testing.assert_close(ours(x, position_ids=positions), expected)
    cache = DynamicCache()
    ours(x[:, :4], cache=cache)
    torch.testing.assert_close(ours(x[:, 4:], cache=cache), expected[:, 4:], rtol=1e-5, atol=1e-5)


def test_without_rope_matches_jamba_attention():
    config = JambaConfig(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    config._attn_implementation = "eager"
    theirs = JambaAttention(config, layer_idx=0).eval()
    ours = SelfAttention(H, HEADS, KV_HEADS, use_rope=False, attn_implementation="eager").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.rotary_emb is None
    x = torch.randn(2, 6, H)
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None)
    torch.testing.assert_close(ours(x, attention_mask=mask), theirs(x, mask)[0], rtol=1e-5, atol=1e-5)


def test_layer_norm_on_queries_and_keys_matches_persimmon():
    """Persimmon's (Fuyu's decoder's) attention: fused q/k/v per head, a LayerNorm on each head's queries and keys,
    half the head dim rotary, biases."""
    from transformers.models.persimmon.configuration_persimmon import PersimmonConfig
    from transformers.models.persimmon.modeling_persimmon import PersimmonAttention, PersimmonRotaryEmbedding

    config = PersimmonConfig(hidden_size=H, num_attention_heads=HEADS, qk_layernorm=True, vocab_size=16,
                             num_hidden_layers=1, intermediate_size=64)
    config._attn_implementation = "eager"
    theirs = PersimmonAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.3)
    ours = SelfAttention(H, HEADS, HEADS, attention_bias=True, attn_implementation="eager", qk_norm="layer",
                         qk_norm_eps=config.layer_norm_eps).eval()
    head_dim = H // HEADS
    q, k, v = theirs.query_key_value.weight.view(HEADS, 3, head_dim, H).unbind(1)
    qb, kb, vb = theirs.query_key_value.bias.view(HEADS, 3, head_dim).unbind(1)
    ours.load_state_dict({
        "q_proj.weight": q.reshape(H, H), "k_proj.weight": k.reshape(H, H), "v_proj.weight": v.reshape(H, H),
        "q_proj.bias": qb.reshape(H), "k_proj.bias": kb.reshape(H), "v_proj.bias": vb.reshape(H),
        "o_proj.weight": theirs.dense.weight, "o_proj.bias": theirs.dense.bias,
        "q_norm.weight": theirs.q_layernorm.weight, "q_norm.bias": theirs.q_layernorm.bias,
        "k_norm.weight": theirs.k_layernorm.weight, "k_norm.bias": theirs.k_layernorm.bias}, strict=True)
    x = torch.randn(2, 6, H)
    positions = torch.arange(6)[None].expand(2, -1)
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None)
    rotary = RotaryEmbedding(config)
    expected = theirs(x, mask, position_embeddings=PersimmonRotaryEmbedding(config)(x, positions))[0]
    torch.testing.assert_close(ours(x, position_embeddings=rotary(x, positions), attention_mask=mask), expected,
                               rtol=1e-5, atol=1e-5)


def test_the_attention_interface_gets_what_transformers_attention_functions_read(monkeypatch):
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs, is_causal=module.is_causal, groups=module.num_key_value_groups,
                    layer_idx=module.layer_idx, implementation=module.config._attn_implementation,
                    shapes=(query.shape, key.shape))
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "ssm_hub_test_spy", spy)
    ours = SelfAttention(H, HEADS, KV_HEADS, head_dim=D, sliding_window=5, layer_idx=3, attention_dropout=0.25,
                         attn_implementation="eager")
    ours.attn_implementation = "ssm_hub_test_spy"  # what a model does with config._attn_implementation
    cu_seqlens = torch.tensor([0, 2, 6], dtype=torch.int32)
    ours.train()(torch.randn(1, 6, H), cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=4,
                 max_length_k=4)
    assert seen["is_causal"] and seen["groups"] == 2 and seen["layer_idx"] == 3
    assert seen["implementation"] == "ssm_hub_test_spy"
    assert seen["scaling"] == D ** -0.5 and seen["sliding_window"] == 5 and seen["dropout"] == 0.25
    assert seen["cu_seq_lens_q"] is cu_seqlens and seen["max_length_k"] == 4
    assert seen["shapes"] == ((1, HEADS, 6, D), (1, KV_HEADS, 6, D))
    ours.eval()(torch.randn(1, 6, H))
    assert seen["dropout"] == 0.0


def test_eager_dropout_only_in_training_and_boolean_masks_work():
    ours = SelfAttention(H, HEADS, KV_HEADS, attention_dropout=0.5, attn_implementation="eager")
    x = torch.randn(2, 5, H)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    ours.eval()
    torch.testing.assert_close(ours(x, attention_mask=causal), ours(x, attention_mask=additive))
    sdpa = SelfAttention(H, HEADS, KV_HEADS, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(ours.state_dict())
    torch.testing.assert_close(sdpa(x), ours(x, attention_mask=causal), rtol=1e-5, atol=1e-5)
    ours.train()
    assert not torch.allclose(ours(x, attention_mask=causal), ours.eval()(x, attention_mask=causal))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=30), "hidden_size"),
    (dict(head_dim=0), "head_dim"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(layer_idx=-1), "layer_idx"),
    (dict(attn_implementation="flash_attention_9"), "attn_implementation"),
    (dict(rope_parameters={"rope_theta": 0.0}), "SelfAttention.rope_parameters: rope_theta"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "max_position_embeddings"),
    (dict(qk_norm="batch"), "qk_norm"),
])
def test_self_attention_refuses_bad_arguments(kwargs, name):
    arguments = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS) | kwargs
    with pytest.raises(ValueError, match=name):
        SelfAttention(**arguments)


@pytest.mark.parametrize("rope_type", [t for t in ROPE_TYPES if t != "default"])
@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.5])
def test_every_rope_type_matches_llamas_rotary(rope_type, partial_rotary_factor):
    """Same config, same cos and sin, bit for bit, through a sequence of lengths that makes dynamic RoPE grow and
    reset and longrope switch between its factors (transformers' Llama reads partial_rotary_factor for every type but
    the default)."""
    config = tiny_config("full", "eager", scaled_rope(rope_type, partial_rotary_factor))
    ours, theirs = RotaryEmbedding(config), LlamaRotaryEmbedding(config)
    assert ours.rotary_dim == (D if rope_type == "proportional" else int(D * partial_rotary_factor))
    assert ours.attention_scaling == theirs.attention_scaling
    default = RotaryEmbedding(tiny_config("full", "eager", {"rope_type": "default", "rope_theta": THETA,
                                                            "partial_rotary_factor": partial_rotary_factor}))
    x = torch.empty(0)
    for length in (6, LONG, 6, LONG + 5):
        positions = torch.arange(length)[None]
        cos, sin = ours(x, positions)
        ref_cos, ref_sin = theirs(x, positions)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
        torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, rtol=0, atol=0)
        if rope_type != "proportional":
            # Dynamic RoPE scales only beyond max_position_embeddings; every other type scales at once.
            assert torch.equal(cos, default(x, positions)[0]) == (rope_type == "dynamic" and length <= MAX_POSITIONS)


def test_the_rotary_keeps_its_own_standardised_copy_of_rope_parameters():
    config = tiny_config("full", "eager", scaled_rope("yarn"))
    rotary = RotaryEmbedding(config)
    config.rope_parameters["factor"] = 8.0
    assert rotary.config.rope_parameters["factor"] == 4.0
    given = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    standardised = rope_config(D, given, MAX_POSITIONS).rope_parameters
    assert standardised == {**given, "rope_theta": 10000.0, "original_max_position_embeddings": MAX_POSITIONS}
    assert "rope_theta" not in given  # transformers' standardisation edited the copy only


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(rope_parameters={"rope_theta": -1.0}), "rope_parameters: rope_theta must be a positive number, got -1.0"),
    (dict(rope_parameters={"partial_rotary_factor": 1.5}), r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
    (dict(rope_parameters={"partial_rotary_factor": 0.1}), "must give an even number >= 2 of rotated channels"),
    (dict(rope_parameters={"rope_type": "ntk"}), "rope_type must be one of"),
    (dict(rope_parameters=[THETA]), "rope_parameters must be a dict"),
    (dict(rope_parameters={"rope_type": "linear"}), r"Missing required keys .*'linear'.*factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.5}), "factor must be a number >= 1"),
    (dict(rope_parameters={"rope_type": "linear", "factor": None}), r"factor must be a number >= 1 .*, got None"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=None),
     "with rope_type 'dynamic': max_position_embeddings must be a positive int, got None"),
    (dict(rope_parameters={**scaled_rope("yarn"), "original_max_position_embeddings": 0}),
     "original_max_position_embeddings must be a positive int, got 0"),
    (dict(rope_parameters={**scaled_rope("yarn"), "beta_fast": "fast"}), "beta_fast must be a number"),
    (dict(rope_parameters={**scaled_rope("yarn"), "attention_factor": -1.0}), "attention_factor must be a positive"),
    (dict(rope_parameters={**scaled_rope("llama3"), "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "high_freq_factor must exceed low_freq_factor"),
    (dict(rope_parameters={**scaled_rope("longrope"), "long_factor": [1.0, 2.0]}),
     r"long_factor must hold one number per rotary frequency \(rotary_dim / 2 = 4\), got 2"),
    (dict(rope_parameters={**scaled_rope("longrope"), "short_factor": "ones"}),
     "short_factor must be a list of positive numbers"),
])
def test_rotary_refuses_bad_arguments(kwargs, message):
    config = SimpleNamespace(**{"head_dim": D, "max_position_embeddings": MAX_POSITIONS, "rope_parameters": {},
                                **kwargs})
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(config)


def test_yarn_and_longrope_compute_what_is_left_unset():
    """None (or no key) for yarn's and longrope's factor and attention factor: transformers computes them from
    max_position_embeddings / original_max_position_embeddings, and so do we."""
    for rope_type in ("yarn", "longrope"):
        rope = {**scaled_rope(rope_type), "factor": None, "attention_factor": None}
        config = tiny_config("full", "eager", rope)
        ours, theirs = RotaryEmbedding(config), LlamaRotaryEmbedding(config)
        assert ours.attention_scaling == theirs.attention_scaling > 1
        positions = torch.arange(LONG)[None]
        torch.testing.assert_close(ours(torch.empty(0), positions), theirs(torch.empty(0), positions), rtol=0, atol=0)


def test_a_rotary_built_on_the_meta_device_computes_its_frequencies_at_its_first_call():
    # What a model built under torch.device("meta") and given its weights by load_state_dict(assign=True) holds.
    config = tiny_config("full", "eager", scaled_rope("longrope"))
    with torch.device("meta"):
        rotary = RotaryEmbedding(config)
    assert rotary.inv_freq.is_meta
    positions = torch.arange(LONG)[None]
    expected = RotaryEmbedding(config)(torch.empty(0), positions)
    torch.testing.assert_close(rotary(torch.empty(0), positions), expected, rtol=0, atol=0)
    assert rotary.inv_freq.device.type == rotary.original_inv_freq.device.type == "cpu"


def test_rotary_keeps_float32_frequencies_through_a_dtype_cast():
    layer = nn.Sequential(SelfAttention(H, HEADS, KV_HEADS, rope_parameters=scaled_rope("yarn"),
                                        max_position_embeddings=MAX_POSITIONS)).to(torch.bfloat16)
    rotary = layer[0].rotary_emb
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert not list(rotary.parameters()) and not rotary.state_dict()  # nothing to save or load
    fresh = RotaryEmbedding(rope_config(D, scaled_rope("yarn"), MAX_POSITIONS))
    positions = torch.tensor([[100000]])
    torch.testing.assert_close(rotary(torch.empty(0), positions), fresh(torch.empty(0), positions), rtol=0, atol=0)
