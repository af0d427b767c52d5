"""The SSD decode-step kernel against the reference: every option, odd sizes, state indices, fp32 and bf16."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.ssd import ssd_step

pytestmark = requires_triton


def _inputs(batch, heads, head_dim, groups, state_size, dtype, slots=None):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    return dict(
        state=torch.randn(slots or batch, heads, head_dim, state_size, device=DEVICE),
        x=rand(batch, heads, head_dim), dt=rand(batch, heads), A=-torch.rand(heads, device=DEVICE) * 4,
        B=rand(batch, groups, state_size), C=rand(batch, groups, state_size),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, heads, head_dim, groups, state_size", [(1, 2, 3, 1, 5), (3, 4, 16, 2, 8), (2, 6, 64, 3, 16)]
)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_kernel_matches_reference(dtype, batch, heads, head_dim, groups, state_size, options):
    inputs = _inputs(batch, heads, head_dim, groups, state_size, dtype)
    if options == "all":
        inputs.update(
            D=torch.randn(heads, head_dim, device=DEVICE), z=torch.randn(batch, heads, head_dim, device=DEVICE).to(dtype),
            dt_bias=torch.randn(heads, device=DEVICE), dt_softplus=True, dt_limit=(0.01, 0.5),
        )
    y, new_state = ssd_step(**inputs, backend="triton")
    y_ref, new_ref = ssd_step(**inputs, backend="torch")
    assert y.dtype == dtype and new_state.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(new_state, new_ref, rtol=1e-5, atol=1e-5)


def test_kernel_reads_state_slots_through_indices():
    inputs = _inputs(3, 2, 8, 1, 4, torch.float32, slots=7)
    inputs.update(D=torch.randn(2, device=DEVICE), dt_softplus=True)
    indices = torch.tensor([5, 0, 3], device=DEVICE)
    y, new_state = ssd_step(**inputs, state_indices=indices, backend="triton")
    y_ref, new_ref = ssd_step(**{**inputs, "state": inputs["state"][indices]}, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, new_ref)


def test_kernel_leaves_the_state_alone_and_takes_strided_inputs():
    inputs = _inputs(2, 4, 8, 2, 4, torch.float32)
    before = inputs["state"].clone()
    wide = torch.randn(2, 4, 16, device=DEVICE)
    inputs["x"] = wide[..., ::2]  # a non-contiguous view, as a split of in_proj's output is
    y, _ = ssd_step(**inputs, backend="triton")
    torch.testing.assert_close(inputs["state"], before, rtol=0, atol=0)
    torch.testing.assert_close(y, ssd_step(**inputs, backend="torch")[0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("indexed", [False, True])
def test_in_place_writes_each_rows_state_over_its_slot(backend, indexed):
    inputs = _inputs(3, 4, 16, 2, 8, torch.bfloat16, slots=6 if indexed else None)
    inputs.update(D=torch.randn(4, device=DEVICE), dt_bias=torch.randn(4, device=DEVICE), dt_softplus=True)
    indices = torch.tensor([4, 0, 2], device=DEVICE) if indexed else None
    pool = inputs.pop("state")
    y_ref, new_ref = ssd_step(pool, **inputs, state_indices=indices, backend="torch")
    expected = pool.clone()
    expected[indices if indexed else slice(None)] = new_ref
    y, returned = ssd_step(pool, **inputs, state_indices=indices, in_place=True, backend=backend)
    assert returned is pool
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(pool, expected, rtol=1e-5, atol=1e-5)  # untouched slots stay exactly as they were


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("log_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_A_given_as_its_log_is_what_a_decoding_mamba2_passes(backend, log_dtype, in_place):
    # A Mamba-2 mixer passes its A_log parameter (in the model's dtype) and the step negates its exp in float32;
    # that must be the step on A = -exp(A_log.float()), which the mixer computed itself before.
    inputs = _inputs(2, 4, 16, 2, 8, torch.bfloat16)
    inputs.update(D=torch.randn(4, device=DEVICE), dt_bias=torch.randn(4, device=DEVICE), dt_softplus=True)
    A_log = torch.log(torch.rand(4, device=DEVICE) * 15 + 1).to(log_dtype)
    y_ref, new_ref = ssd_step(**{**inputs, "A": -torch.exp(A_log.float())}, backend="torch")
    y, new_state = ssd_step(**{**inputs, "A": A_log}, A_is_log=True, in_place=in_place, backend=backend)
    assert (new_state is inputs["state"]) == in_place
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(new_state, new_ref, rtol=1e-5, atol=1e-5)
