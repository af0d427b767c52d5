"""The residual stream of the pure-SSM and hybrid models: blocks in mamba_ssm's form (each adds the previous branch's
output into the stream and norms it in one op) compute the textbook pre-norm stack ``h + branch(norm(h))``, and
without gradients that add-and-norm is one op.

    pytest tests/models/test_residual_stream.py
"""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config

LAYERS = 3
# The op module (its package exports a function of the same name).
gated_rms_norm_ops = importlib.import_module("ssm_hub.ops.gated_rms_norm")


def _model(model_type, dtype):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_hidden_layers=LAYERS)).eval()
    return model.to(dtype)


def _textbook_hidden_states(model, input_ids):
    """Each block's input, then the final normed state: h <- h + mixer(norm(h)), the residual in fp32 as configured."""
    backbone = model.backbone
    hidden = backbone.embeddings(input_ids)
    states = []
    for block in backbone.layers:
        states.append(hidden)
        residual = hidden.float() if block.residual_in_fp32 else hidden
        hidden = residual + block.mixer(block.norm(hidden.to(block.norm.weight.dtype)))
    states.append(backbone.norm_f(hidden.to(backbone.norm_f.weight.dtype)))
    return states


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_compute_the_textbook_pre_norm_stack(model_type, dtype, backend, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", backend)
    # The same roundings in the same order, so float32 agrees to its sums' association. In bf16 the fused kernel's
    # cast of the sum to bf16 rounds to nearest on a GPU, as torch does, but Triton's CPU interpreter truncates: a
    # normed input may then differ by one bf16 step, which the later layers carry.
    exact = dtype == torch.float32 or backend == "torch"
    tolerance = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=2e-2, atol=5e-2)
    model = _model(model_type, dtype)
    input_ids = torch.randint(1, 64, (2, 11))
    with torch.no_grad():
        expected = _textbook_hidden_states(model, input_ids)
        out = model(input_ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == len(expected) == LAYERS + 1
    for index, (state, want) in enumerate(zip(out.hidden_states, expected)):
        assert state.dtype == want.dtype, index
        torch.testing.assert_close(state, want, **tolerance, msg=f"hidden state {index}")
    # Logits in the head's output dtype, as transformers' Llama returns them.
    torch.testing.assert_close(out.logits, model.lm_head(expected[-1]), **tolerance)


def test_without_gradients_each_residual_add_and_norm_is_one_op(model_type, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    calls = []
    fused = gated_rms_norm_ops.add_rms_norm_fwd_op
    monkeypatch.setattr(gated_rms_norm_ops, "add_rms_norm_fwd_op", lambda *args: calls.append(1) or fused(*args))
    model = _model(model_type, torch.float32)
    with torch.no_grad():
        model(torch.randint(1, 64, (1, 5)), use_cache=False)
    # Every block after the first, and the final norm.
    assert len(calls) == LAYERS


def test_training_gradients_match_the_textbook_stack(model_type):
    model = _model(model_type, torch.float32).train()
    input_ids = torch.randint(1, 64, (2, 9))
    grads = []

    def textbook():
        return model.lm_head(_textbook_hidden_states(model, input_ids)[-1])

    for forward in (lambda: model(input_ids).logits, textbook):
        model.zero_grad()
        forward().float().square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_hooks_on_the_norms_still_run(model_type):
    # The fused add-and-norm reads the norm's weight instead of calling the module; a hooked norm must be called.
    model = _model(model_type, torch.float32)
    hooked_norms = [model.backbone.layers[1].norm, model.backbone.norm_f]
    seen = []
    for norm in hooked_norms:
        norm.register_forward_hook(lambda module, args, output: seen.append(module) or output * 2)
    input_ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        final = model(input_ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        assert seen == hooked_norms
        expected = _textbook_hidden_states(model, input_ids)[-1]  # calls the norms as modules: the hooks run
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-5)


def test_hybrid_blocks_compute_the_textbook_pre_norm_stack():
    # The hybrid's blocks in the same form, each feed-forward kind (no attention layer: the textbook below would need
    # its masks and positions, and the attention layer takes part in the residual stream like any mixer).
    config = tiny_config("ssm_hub_hybrid", mixer_types=["mamba2", "mamba", "mamba2"], ffn_types=["mlp", "moe", "none"])
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, use_cache=False)
        hidden, expected = model.model.embed_tokens(input_ids), []
        for block in model.model.layers:
            expected.append(hidden)
            residual = hidden.float() if block.residual_in_fp32 else hidden
            hidden = residual + block.mamba(block.input_layernorm(hidden.to(block.input_layernorm.weight.dtype)))
            if block.ffn_type != "none":
                fed = block.feed_forward(block.pre_ff_layernorm(hidden.to(block.pre_ff_layernorm.weight.dtype)))
                hidden = hidden + (fed[0] if block.ffn_type == "moe" else fed)
        expected.append(model.model.final_layernorm(hidden.to(model.model.final_layernorm.weight.dtype)))
    assert len(out.hidden_states) == len(expected)
    for index, (state, want) in enumerate(zip(out.hidden_states, expected)):
        torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-5, msg=f"hidden state {index}")
    torch.testing.assert_close(out.logits, model.lm_head(expected[-1]).float(), rtol=1e-5, atol=1e-5)
