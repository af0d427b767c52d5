"""On a GPU the models pick the Triton kernels by default (SSM_HUB_BACKEND=auto); they must compute what the torch
reference computes. Marked gpu: run through the device tool, skipped on CPU-only machines."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_backend_matches_torch_reference(model_type, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64, num_hidden_layers=3)).cuda().eval()
    input_ids = torch.randint(1, 64, (3, 37), device="cuda")
    outputs = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        with torch.no_grad():
            logits = model(input_ids).logits
            generated = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        outputs[backend] = (logits, generated)
    torch.testing.assert_close(outputs["auto"][0], outputs["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["auto"][1], outputs["torch"][1])


def test_auto_backend_trains_like_torch_reference(model_type, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64)).cuda().train()
    input_ids = torch.randint(1, 64, (2, 45), device="cuda")
    grads = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["auto"][name], grad, rtol=1e-3, atol=1e-4, msg=name)
