"""The linear ops' dispatch: the kernel takes decoding's calls (one row, bf16 / fp16, no gradient) and nothing else;
bad shapes are named."""

import pytest
import torch
import torch.nn.functional as F

from ssm_hub.ops.linear import linear, swiglu_linear


def _decode_inputs(rows=1, dtype=torch.bfloat16):
    return torch.randn(rows, 1, 16).to(dtype), torch.randn(24, 16).to(dtype), torch.randn(24, 16).to(dtype)


def test_torch_path_is_functional_linear():
    x, gate, up = _decode_inputs(dtype=torch.float32)
    bias = torch.randn(24)
    torch.testing.assert_close(linear(x, gate, bias), F.linear(x, gate, bias), rtol=0, atol=0)
    torch.testing.assert_close(swiglu_linear(x, gate, up, bias), F.silu(F.linear(x, gate, bias)) * F.linear(x, up),
                               rtol=0, atol=0)


def test_what_the_kernel_does_not_cover_runs_in_torch_even_when_triton_is_forced(monkeypatch):
    """SSM_HUB_BACKEND=triton forces the kernels where they exist; training, prefill and float32 linears have none
    and stay ordinary linears. An explicit backend="triton" insists and is refused, naming why."""
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    x, gate, up = _decode_inputs()
    uncovered = {
        "float32": (x.float(), gate.float()),
        "two rows": (torch.randn(2, 1, 16).to(torch.bfloat16), gate),
        "gradient": (x, gate.clone().requires_grad_(True)),
    }
    with torch.autocast("cpu", dtype=torch.float16):  # autocast picks the dtype: torch's linear gives float16
        assert linear(x, gate).dtype == torch.float16
    for name, (inputs, weight) in uncovered.items():
        torch.testing.assert_close(linear(inputs, weight), F.linear(inputs, weight), rtol=0, atol=0, msg=name)
        with pytest.raises(NotImplementedError, match="linear.*no Triton kernel"):
            linear(inputs, weight, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():  # no gradient needed: the kernel covers the call again, and CPU tensors are refused
        with pytest.raises(NotImplementedError, match="linear.*(not CUDA tensors|triton is not installed)"):
            linear(x, gate.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="backend"):
        linear(x.float(), gate.float(), backend="cuda")


def test_bad_shapes_are_named():
    x, gate, up = _decode_inputs()
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 16\]"):
        linear(x, gate[:, :8])
    with pytest.raises(ValueError, match=r"bias must have shape \[24\]"):
        linear(x, gate, torch.zeros(23, dtype=x.dtype))
    with pytest.raises(ValueError, match="up_weight must have weight's shape"):
        swiglu_linear(x, gate, up[:12])
    with pytest.raises(ValueError, match=r"up_bias must have shape \[24\]"):
        swiglu_linear(x, gate, up, None, torch.zeros(3, dtype=x.dtype))
