"""A model on the second GPU while the first is the current device: every kernel must launch on the data's GPU
(ssm_hub.ops.device), else Triton fails with "Pointer argument cannot be accessed from Triton". Needs two GPUs
(the device tool's nvidia-h100-x2)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import randomised, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def test_training_step_and_decoding_on_the_second_gpu(model_type):
    reference = randomised(AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64))).train()
    model = AutoModelForCausalLM.from_config(reference.config).train()
    model.load_state_dict(reference.state_dict())
    reference, model = reference.to("cuda:0"), model.to("cuda:1")
    assert torch.cuda.current_device() == 0
    ids = torch.randint(1, 64, (2, 37))
    for net, device in ((reference, "cuda:0"), (model, "cuda:1")):
        net(ids.to(device), labels=ids.to(device)).loss.backward()
    for (name, expected), got in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(got.grad.to("cuda:0"), expected.grad, msg=name)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model.eval()(ids.to("cuda:1"), cache=cache, use_cache=True)
        step = model(ids[:, :1].to("cuda:1"), cache=cache, use_cache=True).logits
    assert step.device == torch.device("cuda:1") and torch.isfinite(step).all()
