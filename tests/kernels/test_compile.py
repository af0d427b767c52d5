"""The kernels are torch custom ops with fake implementations: torch.compile traces through them in one graph.
Marked gpu (inductor's CPU path would compile C++ for every test); run through the device tool."""

import pytest
import torch

from ssm_hub.ops.ssd import ssd_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_decode_step_compiles_without_graph_breaks():
    state = torch.randn(4, 8, 16, 32, device="cuda")
    x, dt = torch.randn(4, 8, 16, device="cuda"), torch.randn(4, 8, device="cuda")
    A, B, C = -torch.rand(8, device="cuda"), torch.randn(4, 2, 32, device="cuda"), torch.randn(4, 2, 32, device="cuda")

    def step(state, x, dt, A, B, C):
        y, new_state = ssd_step(state, x, dt, A, B, C, dt_softplus=True, backend="triton")
        return y * 2, new_state

    compiled = torch.compile(step, fullgraph=True)
    expected = step(state, x, dt, A, B, C)
    got = compiled(state, x, dt, A, B, C)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
