"""The gated RMSNorm kernels against the reference: output and every gradient, groups, both gate positions, odd
sizes, strided inputs, fp32 and bf16, and a dweight that is the same bits on every run."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops import gated_rms_norm
from ssm_hub.ops.gated_rms_norm import add_rms_norm, add_rms_norm_ref

pytestmark = requires_triton

GATES = {"none": None, "before_norm": False, "after_norm": True}  # gate mode -> norm_before_gate


def _run(x, weight, gate, grad_out, backend, **kwargs):
    """Output and the gradients of <output, grad_out> for x, weight and gate (when given)."""
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, gate) if t is not None]
    x_leaf, weight_leaf = leaves[0], leaves[1]
    gate_leaf = leaves[2] if gate is not None else None
    out = gated_rms_norm(x_leaf, weight_leaf, gate_leaf, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def _check(x, weight, gate, **kwargs):
    """Kernels against the reference, which runs on the same values in float32: the kernels compute in float32 and
    round at their stores (and n before it meets w), where the reference in bf16 would round more often (autograd
    rounds every term of dweight, and the gradient reaching n)."""
    low = any(t is not None and t.dtype == torch.bfloat16 for t in (x, weight, gate))
    tolerance = TOLERANCES[torch.bfloat16 if low else torch.float32]
    grad_out = torch.randn(x.shape, device=DEVICE).to(torch.promote_types(x.dtype, weight.dtype))
    out, grads = _run(x, weight, gate, grad_out, "triton", **kwargs)
    upcast = [t.float() if t is not None else None for t in (x, weight, gate, grad_out)]
    out_ref, grads_ref = _run(*upcast, "torch", **kwargs)
    assert out.dtype == torch.promote_types(x.dtype, weight.dtype) and out.shape == x.shape
    torch.testing.assert_close(out.float(), out_ref, **tolerance)
    for name, got, given, want in zip(("x", "weight", "gate"), grads, (x, weight, gate), grads_ref):
        assert got.dtype == given.dtype and got.shape == given.shape, name
        if name == "weight" and x.dtype == torch.bfloat16:
            _assert_close_up_to_rounding_of_n(got.float(), want, x, gate, grad_out, tolerance, **kwargs)
        else:
            torch.testing.assert_close(got.float(), want, **tolerance, msg=lambda m: f"grad {name}: {m}")


def _assert_close_up_to_rounding_of_n(got, want, x, gate, grad_out, tolerance, **kwargs):
    """dweight = sum over rows of dy * n, with n rounded to bf16 by the kernel (to nearest on a GPU, towards zero in
    Triton's CPU interpreter) and not by the float32 reference. Each term may differ by one bf16 step of n,
    2^-8 |dy n|, and sums that cancel make that large against the total."""
    n = gated_rms_norm(x.float(), torch.ones(x.shape[-1], device=DEVICE), gate, backend="torch", **kwargs)
    slack = 2.0**-8 * (grad_out.float() * n).abs().reshape(-1, x.shape[-1]).sum(0)
    allowed = slack + tolerance["atol"] + tolerance["rtol"] * want.abs()
    excess = (got - want).abs() - allowed
    assert excess.max() <= 0, f"grad weight: {int((excess > 0).sum())} entries beyond the bf16 bound, by {excess.max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading, dim, n_groups", [((1,), 48, 1), ((7,), 100, 4), ((3, 11), 48, 4), ((33,), 100, 1)])
@pytest.mark.parametrize("gate_mode", list(GATES))
def test_kernels_match_reference(dtype, leading, dim, n_groups, gate_mode):
    x = (torch.randn(*leading, dim, device=DEVICE) * 2).to(dtype)
    weight = (1 + 0.5 * torch.randn(dim, device=DEVICE)).to(dtype)
    gate = torch.randn(*leading, dim, device=DEVICE).to(dtype) if GATES[gate_mode] is not None else None
    _check(x, weight, gate, n_groups=n_groups, eps=1e-5, norm_before_gate=bool(GATES[gate_mode]))


@pytest.mark.parametrize("gate_mode", ["before_norm", "after_norm"])
def test_kernels_take_views_split_from_a_projection(gate_mode):
    # The mixer passes y and a gate split from in_proj's output: rows strided past D, channels contiguous.
    projection = torch.randn(2, 5, 3 * 48 + 7, device=DEVICE)
    x, gate = projection[..., 7:55], projection[..., 55 + 48:55 + 96]
    assert not x.is_contiguous() and x.stride(-1) == 1
    _check(x, torch.randn(48, device=DEVICE), gate, n_groups=2, norm_before_gate=GATES[gate_mode])


def test_kernels_take_channels_with_a_stride():
    x = torch.randn(4, 3, 2 * 36, device=DEVICE)[..., ::2]
    gate = torch.randn(4, 36, 3, device=DEVICE).transpose(-1, -2)
    assert x.stride(-1) == 2 and gate.stride(-1) == 3
    _check(x, torch.randn(36, device=DEVICE), gate, n_groups=3)


def test_kernels_take_a_broadcast_output_gradient():
    x, weight, gate = (torch.randn(6, 20, device=DEVICE), torch.randn(20, device=DEVICE),
                       torch.randn(6, 20, device=DEVICE))
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, gate)]
        gated_rms_norm(*leaves, n_groups=2, backend=backend).sum().backward()  # grad_out has stride 0 everywhere
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_kernels_keep_the_promoted_dtype_of_mixed_inputs():
    # A bf16 activation with a float32 weight: y and dweight in float32, dx and dgate in bf16, as in torch.
    x = torch.randn(5, 40, device=DEVICE).to(torch.bfloat16)
    gate = torch.randn(5, 40, device=DEVICE).to(torch.bfloat16)
    _check(x, torch.randn(40, device=DEVICE), gate, n_groups=2)


def test_kernels_take_no_rows():
    x, weight = torch.randn(0, 3, 16, device=DEVICE), torch.randn(16, device=DEVICE, requires_grad=True)
    out = gated_rms_norm(x, weight, backend="triton")
    assert out.shape == x.shape
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight), rtol=0, atol=0)


def test_backward_is_deterministic():
    x = torch.randn(200, 24, device=DEVICE)
    weight, gate, grad_out = torch.randn(24, device=DEVICE), torch.randn_like(x), torch.randn_like(x)
    first = _run(x, weight, gate, grad_out, "triton", n_groups=2)[1]
    second = _run(x, weight, gate, grad_out, "triton", n_groups=2)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_backward_programs_loop_over_several_row_blocks(norm_before_gate):
    # 100 rows of 20 channels are 7 blocks of 16 rows; 2 programs per group take 4 blocks each, the last one short.
    from ssm_hub.kernels.gated_rms_norm import gated_rms_norm_bwd, gated_rms_norm_fwd

    x, gate, grad_out = (torch.randn(100, 20, device=DEVICE) for _ in range(3))
    weight = torch.randn(20, device=DEVICE)
    _, rstd = gated_rms_norm_fwd(x, weight, gate, 2, 1e-5, norm_before_gate)
    grads = gated_rms_norm_bwd(grad_out, x, weight, gate, rstd, 2, norm_before_gate, max_row_programs=2)
    _, (grad_x, grad_weight, grad_gate) = _run(
        x, weight, gate, grad_out, "torch", n_groups=2, norm_before_gate=norm_before_gate
    )
    for got, want in zip(grads, (grad_x, grad_gate, grad_weight)):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_custom_ops_are_registered_with_fake_and_autograd():
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    gate = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.ssm_hub.gated_rms_norm_fwd.default, (x, weight, gate, 2, 1e-5, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype, residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("leading, dim", [((1, 1), 48), ((3, 5), 100), ((2, 1), 1024)])
def test_add_rms_norm_kernel_matches_reference(dtype, residual_dtype, leading, dim):
    """The residual step and the norm after it in one launch: the sum (the stream's dtype) and the normed output.
    x and the residual are slices of wider tensors (row strides unlike the output's)."""
    x = torch.randn(*leading, 2 * dim, device=DEVICE).to(dtype)[..., dim // 2:dim // 2 + dim]
    residual = (torch.randn(*leading, 3 * dim, device=DEVICE) * 3).to(residual_dtype)[..., dim:2 * dim]
    weight = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    with torch.no_grad():
        normed, total = add_rms_norm(x, residual, weight, backend="triton")
        normed_ref, total_ref = add_rms_norm_ref(x, residual, weight)
    assert total.dtype == total_ref.dtype and normed.dtype == normed_ref.dtype == dtype
    # One float32 add; a bf16 sum is rounded once more (to nearest on a GPU, towards zero in the interpreter).
    one_rounding = dict(rtol=2.0**-7, atol=0) if residual_dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(total.float(), total_ref.float(), **one_rounding)
    torch.testing.assert_close(normed.float(), normed_ref.float(), **TOLERANCES[dtype])
