"""Training behaviour of every ssm_hub architecture: loss, backward, gradient checkpointing and initialisation."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import tiny_config


def _batch(vocab_size=64, batch=2, length=12):
    return torch.randint(1, vocab_size, (batch, length))


def test_loss_and_backward_reach_every_parameter(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).train()
    input_ids = _batch()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_num_items_in_batch_normalises_the_summed_loss(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    input_ids = _batch()
    labels = input_ids.clone()
    labels[0, :5] = -100
    mean_loss = model(input_ids=input_ids, labels=labels).loss
    counted = int((labels[:, 1:] != -100).sum())
    loss_over_items = model(input_ids=input_ids, labels=labels, num_items_in_batch=2 * counted).loss
    torch.testing.assert_close(loss_over_items, mean_loss / 2)


def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).train()
    input_ids = _batch()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


def test_no_split_modules_names_the_block(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    block_names = {type(layer).__name__ for layer in model.backbone.layers}
    assert block_names == set(model._no_split_modules)


def test_ssm_parameters_are_initialised_as_the_papers_do(model_type):
    config = tiny_config(model_type, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config)
    mixer = model.backbone.layers[0].mixer
    torch.testing.assert_close(mixer.D, torch.ones_like(mixer.D))
    if model_type == "ssm_hub_mamba":
        expected_A = torch.arange(1, config.state_size + 1, dtype=torch.float32).expand_as(mixer.A_log)
        torch.testing.assert_close(torch.exp(mixer.A_log), expected_A)
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        bound = config.time_step_rank**-0.5 * config.time_step_scale
        assert mixer.dt_proj.weight.abs().max() <= bound
    else:
        A = torch.exp(mixer.A_log)
        assert (A >= config.A_init_range[0]).all() and (A <= config.A_init_range[1]).all()
        dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= config.time_step_min * 0.999).all() and (dt <= config.time_step_max * 1.001).all()
    assert dt.std() > 0, "dt must be sampled, not constant"
    # out_proj is scaled by 1/sqrt(num_layers) against the default kaiming bound 1/sqrt(fan_in).
    fan_in = mixer.out_proj.weight.shape[1]
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(fan_in) / math.sqrt(4) + 1e-6
    torch.testing.assert_close(model.backbone.norm_f.weight, torch.ones_like(model.backbone.norm_f.weight))


def test_sequence_classification_pools_the_last_real_token(model_type):
    config = tiny_config(model_type, num_labels=3, pad_token_id=0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    row = torch.randint(1, 64, (1, 7))
    alone = model(input_ids=row).logits
    padded = torch.cat([row, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, alone)
    torch.testing.assert_close(model(input_ids=padded).logits, alone)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    torch.testing.assert_close(model(input_ids=left, attention_mask=mask.flip(1)).logits, alone, atol=1e-5, rtol=1e-4)
    out = model(input_ids=padded, attention_mask=mask, labels=torch.tensor([2]))
    assert out.loss is not None and out.logits.shape == (1, 3)


def test_unknown_forward_kwargs_are_rejected(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with pytest.raises(TypeError, match="not_a_kwarg"):
        model(input_ids=_batch(), not_a_kwarg=1)


def test_backend_environment_variable_reaches_the_model(model_type, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    input_ids = _batch()
    monkeypatch.setenv("SSM_HUB_BACKEND", "torch")
    expected = model(input_ids).logits
    # Without Triton's CPU interpreter, asking for the kernels on CPU tensors is refused, naming the reason.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="backend='triton'.*not CUDA tensors"):
        model(input_ids)
    monkeypatch.setenv("SSM_HUB_BACKEND", "auto")
    torch.testing.assert_close(model(input_ids).logits, expected)


def test_inputs_embeds_and_logits_to_keep(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    input_ids = _batch()
    full = model(input_ids).logits
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, full)
    torch.testing.assert_close(model(input_ids, logits_to_keep=3).logits, full[:, -3:])
    torch.testing.assert_close(model(input_ids, return_dict=False)[0], full)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids, inputs_embeds=embeds)


def test_sequence_classification_accepts_use_cache_false_and_refuses_true(model_type):
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=2))
    assert model(_batch(), use_cache=False).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="keeps no cache"):
        model(_batch(), use_cache=True)


def test_config_accepts_transformers_derived_fields_only_when_they_agree(model_type):
    config = tiny_config(model_type)
    same = type(config)(**{**config.to_diff_dict(), "intermediate_size": config.intermediate_size})
    assert same.intermediate_size == config.intermediate_size
    with pytest.raises(ValueError, match="intermediate_size is derived"):
        type(config)(**{**config.to_diff_dict(), "intermediate_size": config.intermediate_size + 1})
