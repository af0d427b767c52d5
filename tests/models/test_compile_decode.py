"""A decode step through transformers' StaticCache traces into one torch.compile graph, with the torch reference and
with the Triton kernels (their custom ops' fake implementations): generate(cache_implementation="static") compiles
it, and every graph break there costs a recompilation per token."""

import pytest
from transformers import AutoModelForCausalLM

from conftest import assert_decode_step_is_one_graph, tiny_config
from ssm_hub.backend import triton_available

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_decode_step_has_no_graph_breaks(model_type, backend, monkeypatch):
    assert_decode_step_is_one_graph(AutoModelForCausalLM.from_config(tiny_config(model_type)).eval(), backend,
                                    monkeypatch)
