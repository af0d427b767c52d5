"""A decode step through transformers' StaticCache traces into one torch.compile graph, with the torch reference and
with the Triton kernels (their custom ops' fake implementations): generate(cache_implementation="static") compiles
it, and every graph break there costs a recompilation per token."""

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

from conftest import tiny_config
from ssm_hub.backend import triton_available

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_decode_step_has_no_graph_breaks(model_type, backend, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(1, 64, (1, 5)), cache=cache, use_cache=True)
        # Decode steps only run step kernels, so forcing triton reaches every kernel a token uses.
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        explanation = torch._dynamo.explain(lambda token: model(token, cache=cache, use_cache=True).logits)(
            torch.randint(1, 64, (1, 1))
        )
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1
