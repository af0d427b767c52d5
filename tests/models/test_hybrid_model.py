"""The hybrid SSM / attention / MoE model on tiny configs: Auto classes, training with the router losses, cached
generation (dynamic and static cache) equal to recomputation, left padding, packed rows, gradient checkpointing,
save / load with the code bundle, loading with trust_remote_code where ssm_hub is not installed, LoRA defaults and
expert adapters, and the errors it raises."""

import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    StaticCache,
)

import ssm_hub
from conftest import assert_decode_step_is_one_graph
from ssm_hub.layers.moe import load_balancing_loss
from test_save_load import assert_loads_without_ssm_hub


def tiny(**overrides):
    # Every mixer and feed-forward kind: Mamba-2 + MLP, attention + MoE, Mamba-1 + none, sliding + PKM, Mamba-2 + MoE.
    fields = dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=5,
        mixer_types=["mamba2", "attention", "mamba", "sliding_attention", "mamba2"],
        ffn_types=["mlp", "moe", "none", "pkm", "moe"], pkm_num_keys=8, pkm_heads=2, pkm_key_dim=16, pkm_topk=3,
        sliding_window=5, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_experts=4,
        num_experts_per_tok=2, mamba_d_state=16, mamba_d_head=16, mamba_n_groups=2, mamba_chunk_size=8,
    )
    return ssm_hub.SsmHubHybridConfig(**{**fields, **overrides})


def gpt2_block(**overrides):
    """The tiny hybrid with GPT-2's block: LayerNorms, learned absolute positions, a plain GELU MLP, biases."""
    return tiny(norm_type="layer", use_rope=False, absolute_position_embeddings=True, max_position_embeddings=64,
                mlp_type="plain", hidden_act="gelu_new", mlp_bias=True, attention_bias=True, **overrides)


def full_attention(**overrides):
    """The tiny hybrid with full attention in place of sliding-window attention: what generate's default decoder
    captures (transformers' static cache tracks sliding layers on the host)."""
    return tiny(mixer_types=["mamba2", "attention", "mamba", "attention", "mamba2"], **overrides)


def model_for(config=None):
    return AutoModelForCausalLM.from_config(config or tiny()).eval()


def greedy_by_recomputation(model, prompt, new_tokens):
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def test_auto_classes_build_the_hybrid():
    config = tiny()
    assert type(AutoModel.from_config(config)).__name__ == "SsmHubHybridModel"
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, ssm_hub.SsmHubHybridForCausalLM)
    kinds = [(type(getattr(block, "mamba", None) or block.self_attn).__name__, block.ffn_type)
             for block in model.model.layers]
    assert kinds == [("Mamba2Mixer", "mlp"), ("SelfAttention", "moe"), ("MambaMixer", "none"),
                     ("SelfAttention", "pkm"), ("Mamba2Mixer", "moe")]
    assert type(model.model.layers[3].feed_forward).__name__ == "ProductKeyMemory"
    assert model.model.layers[3].self_attn.sliding_window == 5 and model.model.layers[1].self_attn.sliding_window is None


def test_training_step_adds_the_router_losses_and_reaches_every_parameter():
    config = tiny(router_z_loss_coef=0.01)
    model = AutoModelForCausalLM.from_config(config).train()
    input_ids = torch.randint(1, 97, (2, 13))
    plain = model(input_ids, labels=input_ids)
    assert plain.aux_loss is None and plain.router_logits is None
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 13, 4)
    balance = load_balancing_loss(out.router_logits, 4, 2)
    assert out.aux_loss > config.router_aux_loss_coef * balance  # the z-loss term is there too
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("config", [tiny, gpt2_block, full_attention])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_cached_greedy_generation_equals_recomputation(cache_implementation, config, decoding):
    model = model_for(config())
    prompt = torch.randint(1, 97, (2, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, **decoding)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    with torch.no_grad():
        generated = model.generate(prompt, **kwargs)
    assert torch.equal(generated, greedy_by_recomputation(model, prompt, 8))


@pytest.mark.parametrize("config", [tiny, gpt2_block, full_attention])
def test_left_padded_row_generates_its_own_tokens(config, decoding):
    model = model_for(config())
    long, short = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, **decoding)
    with torch.no_grad():
        padded = model.generate(batch, attention_mask=mask, **kwargs)
        alone = model.generate(short, **kwargs)
    assert torch.equal(padded[1, 6:], alone[0, 4:])


@pytest.mark.parametrize("cache", ["none", "default", "static"])
def test_packed_rows_equal_their_documents_run_separately(cache):
    # Every layer kind, sliding-window attention included, with the cache a user gets by default, none, or static.
    model = model_for()
    first, second = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 9))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    cache_kwargs = {"none": {"use_cache": False}, "default": {},
                    "static": {"cache": StaticCache(config=model.config, max_cache_len=20)}}[cache]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, **cache_kwargs).logits
        expected = torch.cat([model(first, use_cache=False).logits, model(second, use_cache=False).logits], dim=1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_class", ["DynamicCache", "StaticCache"])
def test_continuing_from_a_cache_without_position_ids_takes_the_positions_after_it(cache_class):
    # The first layer is Mamba-2, whose cache slot does not count the tokens seen: the count is an attention layer's.
    model = model_for()
    input_ids = torch.randint(1, 97, (1, 16))
    cache = DynamicCache(config=model.config) if cache_class == "DynamicCache" else \
        StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        first = model(input_ids[:, :10], cache=cache).logits
        rest = model(input_ids[:, 10:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = AutoModelForCausalLM.from_config(tiny()).train()
    input_ids = torch.randint(1, 97, (2, 11))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_save_load_round_trip_with_code_bundle(tmp_path):
    model = model_for()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ssm_hub_hybrid"
    assert config["mixer_types"] == model.config.mixer_types
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"} <= set(
        config["auto_map"])
    assert (tmp_path / "modeling_hybrid.py").exists() and (tmp_path / "configuration_hybrid.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


def test_a_cache_not_built_from_the_config_is_refused():
    model = model_for()
    wrong = DynamicCache(config=tiny(mixer_types=["mamba2"] * 5, ffn_types=["mlp"] * 5))
    with pytest.raises(ValueError, match="cache must be built from the model's config"):
        model(torch.randint(1, 97, (1, 5)), cache=wrong)


def test_unknown_keyword_arguments_are_refused():
    model = model_for()
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model(torch.randint(1, 97, (1, 5)), not_an_argument=1)


@pytest.mark.parametrize("config", [tiny, gpt2_block])
def test_loads_with_trust_remote_code_without_ssm_hub(tmp_path, config):
    # The code bundle (hybrid model, attention, MoE, the SSM mixers and their kernels' dispatch) runs where
    # ssm_hub cannot be imported.
    model = model_for(config())
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert_loads_without_ssm_hub(model, checkpoint, torch.randint(1, 97, (2, 9)), tmp_path)


@pytest.mark.parametrize("boundaries", ["cu_seq_lens_q", "cu_seqlens", "seq_idx"])
def test_documents_given_without_position_ids_stay_apart_in_every_layer(boundaries):
    # With only cu_seqlens / seq_idx, the SSM layers reset their state and the attention layers must not look
    # across documents either.
    model = model_for()
    docs = [torch.randint(1, 97, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    value = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 9, 3]))[None].int() \
        if boundaries == "seq_idx" else cu_seqlens
    with torch.no_grad():
        expected = torch.cat([model(doc[None], use_cache=False).logits[0] for doc in docs])
        got = model(packed, use_cache=False, **{boundaries: value}).logits[0]
        leaked = model(packed, use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaked[5:], expected[5:], atol=1e-3), "the test must see the leak"


def test_attention_implementation_follows_the_model():
    model = AutoModelForCausalLM.from_config(tiny(), attn_implementation="eager").eval()
    attention = [block.self_attn for block in model.model.layers if hasattr(block, "self_attn")]
    assert {layer.attn_implementation for layer in attention} == {"eager"}
    input_ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        eager = model(input_ids).logits
        model.set_attn_implementation("sdpa")
        assert {layer.attn_implementation for layer in attention} == {"sdpa"}
        sdpa = model(input_ids).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


def test_sequence_classification_pools_the_last_real_token_and_adds_router_losses():
    model = AutoModelForSequenceClassification.from_config(tiny(num_labels=3, pad_token_id=0)).eval()
    assert isinstance(model, ssm_hub.SsmHubHybridForSequenceClassification)
    row = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        alone = model(input_ids=row).logits
        right = torch.cat([row, torch.zeros(1, 3, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
        torch.testing.assert_close(model(input_ids=right, attention_mask=mask).logits, alone)
        left = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
        torch.testing.assert_close(model(input_ids=left, attention_mask=mask.flip(1)).logits, alone,
                                   rtol=1e-4, atol=1e-5)
    out = model(input_ids=right, attention_mask=mask, labels=torch.tensor([2]), output_router_logits=True)
    assert out.logits.shape == (1, 3) and out.aux_loss > 0
    plain = model(input_ids=right, attention_mask=mask, labels=torch.tensor([2]))
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)
    with pytest.raises(ValueError, match="keeps no cache"):
        model(input_ids=row, use_cache=True)


def test_lora_defaults_cover_attention_and_ssm_projections_and_experts_take_target_parameters():
    from peft import LoraConfig, get_peft_model

    model = model_for()
    input_ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        base = model(input_ids).logits
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "dt_proj", "out_proj"}

    experts = get_peft_model(model_for(), LoraConfig(  # target_modules=[]: PEFT would add the defaults otherwise
        r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    trainable = {name for name, param in experts.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name and ".experts." in name for name in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, two expert weights, two MoE layers
    with torch.no_grad():
        for name, param in experts.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    assert (experts(input_ids).logits - base).abs().max() > 1e-3  # the expert adapters take effect
    assert set(model._no_split_modules) == {"HybridBlock"}
    assert {type(block).__name__ for block in model.model.layers} == {"HybridBlock"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_decode_step_traces_into_one_graph(backend, monkeypatch):
    # Every mixer and feed-forward kind, the MoE in float32 (its experts then run densely under compile).
    from ssm_hub.backend import triton_available

    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    assert_decode_step_is_one_graph(model_for(), backend, monkeypatch)
