"""The selective-scan (Mamba-1) decode-step kernel against the reference: every option, odd sizes, several channel
blocks, state indices, strided inputs, fp32 and bf16."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.selective_scan import selective_scan_step

pytestmark = requires_triton


def _inputs(batch, dim, state_size, dtype, slots=None):
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    return dict(
        state=torch.randn(slots or batch, dim, state_size, device=DEVICE),
        u=rand(batch, dim), delta=torch.rand(batch, dim, device=DEVICE).to(dtype),
        A=-(torch.rand(dim, state_size, device=DEVICE) * 4 + 0.1), B=rand(batch, state_size), C=rand(batch, state_size),
    )


def _options(batch, dim, dtype, softplus=True):
    return dict(
        D=torch.randn(dim, device=DEVICE), z=torch.randn(batch, dim, device=DEVICE).to(dtype),
        delta_bias=torch.randn(dim, device=DEVICE), delta_softplus=softplus,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (3, 300, 16) spans three blocks of channels, the last one partial; 5 and 12 are not powers of two.
@pytest.mark.parametrize("batch, dim, state_size", [(1, 3, 5), (2, 37, 12), (3, 300, 16)])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_kernel_matches_reference(dtype, batch, dim, state_size, options):
    inputs = _inputs(batch, dim, state_size, dtype)
    if options == "all":
        inputs.update(_options(batch, dim, dtype))
    y, new_state = selective_scan_step(**inputs, backend="triton")
    y_ref, new_ref = selective_scan_step(**inputs, backend="torch")
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert y.shape == (batch, dim) and new_state.shape == (batch, dim, state_size)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(new_state, new_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["D", "z", "delta_bias", "delta_softplus"])
def test_each_option_alone(name):
    # Every option on its own, so that one applied in the wrong place cannot be hidden by another.
    inputs = _inputs(2, 9, 4, torch.float32)
    inputs["delta"] = torch.randn(2, 9, device=DEVICE)  # negative deltas too: softplus must matter
    inputs[name] = _options(2, 9, torch.float32)[name]
    y, new_state = selective_scan_step(**inputs, backend="triton")
    y_ref, new_ref = selective_scan_step(**inputs, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref)


def test_kernel_reads_state_slots_through_indices():
    inputs = _inputs(3, 10, 4, torch.float32, slots=7)
    inputs.update(_options(3, 10, torch.float32))
    indices = torch.tensor([5, 0, 5], device=DEVICE)  # a slot may be read by two rows
    y, new_state = selective_scan_step(**inputs, state_indices=indices, backend="triton")
    y_ref, new_ref = selective_scan_step(**{**inputs, "state": inputs["state"][indices]}, backend="torch")
    assert new_state.shape == (3, 10, 4)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref)


def test_kernel_leaves_the_state_alone_and_takes_strided_inputs():
    batch, dim, state_size = 2, 12, 6
    # As in the Mamba mixer: u and z are halves of in_proj's output, delta / B / C slices of x_proj's; here every
    # tensor is a non-contiguous view, the state too.
    in_proj = torch.randn(batch, 2 * dim, device=DEVICE)
    x_proj = torch.randn(batch, dim + 2 * state_size + 3, device=DEVICE)
    state = torch.randn(batch, state_size, dim, device=DEVICE).transpose(1, 2)
    inputs = dict(
        state=state, u=in_proj[:, :dim], z=in_proj[:, dim:], delta=x_proj[:, :dim],
        B=x_proj[:, dim : dim + state_size], C=x_proj[:, dim + state_size : dim + 2 * state_size],
        A=-torch.rand(state_size, dim, device=DEVICE).t(), D=torch.randn(dim, device=DEVICE), delta_softplus=True,
    )
    assert not any(t.is_contiguous() for t in (state, inputs["u"], inputs["z"], inputs["B"], inputs["A"]))
    before = state.clone()
    y, new_state = selective_scan_step(**inputs, backend="triton")
    torch.testing.assert_close(state, before, rtol=0, atol=0)
    y_ref, new_ref = selective_scan_step(**inputs, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref)


def test_steps_follow_the_reference_over_many_tokens():
    # Feeding the kernel's new state back in, step after step, stays with the reference's recurrence.
    inputs = _inputs(2, 8, 4, torch.float32)
    options = _options(2, 8, torch.float32)
    state = state_ref = inputs.pop("state")
    for _ in range(6):
        step = {**inputs, **options, "u": torch.randn(2, 8, device=DEVICE), "B": torch.randn(2, 4, device=DEVICE)}
        y, state = selective_scan_step(state, **step, backend="triton")
        y_ref, state_ref = selective_scan_step(state_ref, **step, backend="torch")
        torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("indexed", [False, True])
def test_in_place_writes_each_rows_state_over_its_slot(backend, indexed):
    inputs = {**_inputs(3, 40, 16, torch.bfloat16, slots=6 if indexed else None), **_options(3, 40, torch.bfloat16)}
    indices = torch.tensor([4, 0, 2], device=DEVICE) if indexed else None
    pool = inputs.pop("state")
    y_ref, new_ref = selective_scan_step(pool, **inputs, state_indices=indices, backend="torch")
    expected = pool.clone()
    expected[indices if indexed else slice(None)] = new_ref
    y, returned = selective_scan_step(pool, **inputs, state_indices=indices, in_place=True, backend=backend)
    assert returned is pool
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(pool, expected, rtol=1e-5, atol=1e-5)  # untouched slots stay exactly as they were


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("log_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_A_given_as_its_log_is_what_a_decoding_mamba_passes(backend, log_dtype, in_place):
    # A Mamba mixer passes its A_log parameter (in the model's dtype) and the step negates its exp in float32; that
    # must be the step on A = -exp(A_log.float()), which the mixer computed itself before.
    inputs = {**_inputs(2, 37, 12, torch.bfloat16), **_options(2, 37, torch.bfloat16)}
    A_log = torch.log(torch.rand(37, 12, device=DEVICE) * 15 + 1).to(log_dtype)
    y_ref, new_ref = selective_scan_step(**{**inputs, "A": -torch.exp(A_log.float())}, backend="torch")
    y, new_state = selective_scan_step(**{**inputs, "A": A_log}, A_is_log=True, in_place=in_place, backend=backend)
    assert (new_state is inputs["state"]) == in_place
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(new_state, new_ref, rtol=1e-5, atol=1e-5)
