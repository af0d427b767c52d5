"""The causal conv1d decode-step kernel against the reference: widths 2 to 5, bias and SiLU on and off, odd channel
counts and several channel blocks, state indices, strided inputs, fp32 and bf16, the states' own dtypes."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.causal_conv1d import causal_conv1d_step

pytestmark = requires_triton


def _inputs(batch, channels, width, dtype, state_dtype=None, slots=None):
    return dict(
        x=torch.randn(batch, channels, device=DEVICE).to(dtype),
        conv_state=torch.randn(slots or batch, channels, width - 1, device=DEVICE).to(state_dtype or dtype),
        weight=torch.randn(channels, width, device=DEVICE),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [2, 3, 4, 5])
# 600 channels span several blocks of channels, the last one partial.
@pytest.mark.parametrize("batch, channels", [(1, 3), (3, 600)])
@pytest.mark.parametrize("with_bias, activation", [(False, None), (True, "silu")])
def test_kernel_matches_reference(dtype, width, batch, channels, with_bias, activation):
    inputs = _inputs(batch, channels, width, dtype)
    inputs.update(bias=torch.randn(channels, device=DEVICE) if with_bias else None, activation=activation)
    y, new_state = causal_conv1d_step(**inputs, backend="triton")
    y_ref, new_ref = causal_conv1d_step(**inputs, backend="torch")
    assert y.dtype == dtype and new_state.dtype == dtype
    assert y.shape == (batch, channels) and new_state.shape == (batch, channels, width - 1)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(new_state, new_ref, rtol=0, atol=0)  # a shift: copied, not computed


@pytest.mark.parametrize("with_bias, activation", [(True, None), (False, "silu")])
def test_bias_and_silu_each_alone(with_bias, activation):
    inputs = _inputs(2, 7, 4, torch.float32)
    inputs.update(bias=torch.randn(7, device=DEVICE) if with_bias else None, activation=activation)
    y, _ = causal_conv1d_step(**inputs, backend="triton")
    torch.testing.assert_close(y, causal_conv1d_step(**inputs, backend="torch")[0])


@pytest.mark.parametrize("x_dtype, state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_state_keeps_its_own_dtype(x_dtype, state_dtype):
    inputs = _inputs(2, 9, 4, x_dtype, state_dtype=state_dtype)
    inputs.update(bias=torch.randn(9, device=DEVICE), activation="silu")
    y, new_state = causal_conv1d_step(**inputs, backend="triton")
    y_ref, new_ref = causal_conv1d_step(**inputs, backend="torch")
    assert y.dtype == x_dtype and new_state.dtype == state_dtype
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    # The cached inputs are copied exactly. This token's input is rounded to the state's dtype: Triton's CPU
    # interpreter truncates float32 -> bfloat16 where torch (and the GPU) round to nearest, hence one bf16 ulp.
    torch.testing.assert_close(new_state[..., :-1], new_ref[..., :-1], rtol=0, atol=0)
    torch.testing.assert_close(new_state[..., -1], new_ref[..., -1], rtol=2**-7, atol=0)


@pytest.mark.parametrize("width", [2, 4])
def test_kernel_reads_state_slots_through_indices(width):
    inputs = _inputs(3, 10, width, torch.float32, slots=6)
    inputs.update(bias=torch.randn(10, device=DEVICE), activation="silu")
    indices = torch.tensor([4, 0, 4], device=DEVICE)  # a slot may be read by two rows
    y, new_state = causal_conv1d_step(**inputs, state_indices=indices, backend="triton")
    y_ref, new_ref = causal_conv1d_step(**{**inputs, "conv_state": inputs["conv_state"][indices]}, backend="torch")
    assert new_state.shape == (3, 10, width - 1)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref, rtol=0, atol=0)


def test_kernel_leaves_the_state_alone_and_takes_strided_inputs():
    batch, channels, width = 2, 11, 4
    # As in the Mamba-2 mixer: x is the xBC slice of in_proj's output. The state and weight are strided views too.
    in_proj = torch.randn(batch, 3 * channels, device=DEVICE)
    x = in_proj[:, channels : 2 * channels]
    conv_state = torch.randn(batch, width - 1, channels, device=DEVICE).transpose(1, 2)
    weight = torch.randn(width, channels, device=DEVICE).t()
    assert not any(t.is_contiguous() for t in (x, conv_state, weight))
    before = conv_state.clone()
    inputs = dict(x=x, conv_state=conv_state, weight=weight, bias=torch.randn(channels, device=DEVICE),
                  activation="silu")
    y, new_state = causal_conv1d_step(**inputs, backend="triton")
    torch.testing.assert_close(conv_state, before, rtol=0, atol=0)
    y_ref, new_ref = causal_conv1d_step(**inputs, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref, rtol=0, atol=0)


def test_steps_follow_the_reference_over_many_tokens():
    inputs = _inputs(2, 5, 4, torch.float32)
    weight, bias = inputs["weight"], torch.randn(5, device=DEVICE)
    state = state_ref = inputs["conv_state"]
    for _ in range(6):
        x = torch.randn(2, 5, device=DEVICE)
        y, state = causal_conv1d_step(x, state, weight, bias, "silu", backend="triton")
        y_ref, state_ref = causal_conv1d_step(x, state_ref, weight, bias, "silu", backend="torch")
        torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_in_place_writes_each_rows_window_over_its_slot(backend, indexed, width):
    # 600 channels: several programs, so the barrier between reading the window and writing it back matters.
    inputs = _inputs(3, 600, width, torch.bfloat16, slots=6 if indexed else None)
    inputs.update(bias=torch.randn(600, device=DEVICE), activation="silu")
    indices = torch.tensor([4, 0, 2], device=DEVICE) if indexed else None
    x, pool = inputs.pop("x"), inputs.pop("conv_state")
    y_ref, new_ref = causal_conv1d_step(x, pool, **inputs, state_indices=indices, backend="torch")
    expected = pool.clone()
    expected[indices if indexed else slice(None)] = new_ref
    y, returned = causal_conv1d_step(x, pool, **inputs, state_indices=indices, in_place=True, backend=backend)
    assert returned is pool
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(pool, expected, rtol=0, atol=0)
