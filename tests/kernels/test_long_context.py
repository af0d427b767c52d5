"""Long context on the GPU kernels: bf16 SSD and Mamba-1 scans over 128K and 512K tokens (batch 1) stay finite and
within bf16 tolerance of the same kernel run on the same inputs in float32, final states included, and their
gradients stay finite at 128K. Marked gpu: run through the device tool, skipped on CPU-only machines.

    pytest -m gpu tests/kernels/test_long_context.py
"""

import math

import pytest
import torch

from ssm_hub.ops.selective_scan import selective_scan
from ssm_hub.ops.ssd import ssd_chunked_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [128 * 1024, 512 * 1024]
# bf16 inputs carry 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3); the states accumulate in float32 in both
# runs, so the outputs differ by the rounding of the inputs propagated through the recurrence. A drifting state (error
# that grows with length) would exceed this at 512K tokens.
BF16_RELATIVE_TOLERANCE = 2e-2


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def ssd_inputs(seq_len: int, heads: int = 8, head_dim: int = 64, state: int = 128) -> dict:
    """A Mamba-2 layer's inputs: softplus(dt + dt_bias) in [1e-3, 0.1], A in [-16, -1]."""
    torch.manual_seed(0)
    dt_init = torch.exp(torch.empty(heads, device="cuda").uniform_(math.log(1e-3), math.log(0.1)))
    return dict(
        x=torch.randn(1, seq_len, heads, head_dim, device="cuda"),
        dt=torch.randn(1, seq_len, heads, device="cuda") * 0.5,
        A=-torch.empty(heads, device="cuda").uniform_(1, 16),
        B=torch.randn(1, seq_len, 1, state, device="cuda"),
        C=torch.randn(1, seq_len, 1, state, device="cuda"),
        D=torch.randn(heads, device="cuda"),
        z=torch.randn(1, seq_len, heads, head_dim, device="cuda"),
        dt_bias=inverse_softplus(dt_init),
    )


def mamba1_inputs(seq_len: int, dim: int = 256, state: int = 16) -> dict:
    """A Mamba-1 layer's inputs: S4D-real A, softplus(delta + delta_bias) in [1e-3, 0.1] on average."""
    torch.manual_seed(0)
    dt_init = torch.exp(torch.empty(dim, device="cuda").uniform_(math.log(1e-3), math.log(0.1)))
    return dict(
        u=torch.randn(1, seq_len, dim, device="cuda"),
        delta=torch.randn(1, seq_len, dim, device="cuda") * 0.5,
        A=-torch.arange(1, state + 1, device="cuda", dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(1, seq_len, state, device="cuda"),
        C=torch.randn(1, seq_len, state, device="cuda"),
        D=torch.ones(dim, device="cuda"),
        z=torch.randn(1, seq_len, dim, device="cuda"),
        delta_bias=inverse_softplus(dt_init),
    )


# Sequence inputs go to bf16; the per-channel parameters stay float32, as a bf16 model keeps them.
SSD_SEQUENCE = ("x", "dt", "B", "C", "z")
MAMBA1_SEQUENCE = ("u", "delta", "B", "C", "z")


def run_ssd(inputs: dict):
    return ssd_chunked_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 256, D=inputs["D"],
                            z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True, return_final_states=True,
                            backend="triton")


def run_mamba1(inputs: dict):
    return selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                          z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True,
                          return_final_state=True, backend="triton")


CASES = {"ssd": (ssd_inputs, run_ssd, SSD_SEQUENCE), "mamba1": (mamba1_inputs, run_mamba1, MAMBA1_SEQUENCE)}


@pytest.mark.parametrize("seq_len", LENGTHS, ids=["128K", "512K"])
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_scan_at_long_context_stays_finite_and_near_float32(case, seq_len):
    make_inputs, run, sequence = CASES[case]
    inputs = make_inputs(seq_len)
    with torch.no_grad():
        reference_out, reference_state = run(inputs)
        bf16 = {name: value.to(torch.bfloat16) if name in sequence else value for name, value in inputs.items()}
        out, state = run(bf16)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert relative_error(out, reference_out) < BF16_RELATIVE_TOLERANCE
    assert relative_error(state, reference_state) < BF16_RELATIVE_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_scan_gradients_at_128k_are_finite(case):
    make_inputs, run, sequence = CASES[case]
    inputs = {name: (value.to(torch.bfloat16) if name in sequence else value).requires_grad_(True)
              for name, value in make_inputs(128 * 1024).items()}
    out, state = run(inputs)
    (out.float().square().mean() + state.square().mean()).backward()
    for name, value in inputs.items():
        assert torch.isfinite(value.grad).all(), name
