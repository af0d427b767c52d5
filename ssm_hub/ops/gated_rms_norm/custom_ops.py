"""The gated RMSNorm kernels registered as torch custom ops (``torch.ops.ssm_hub.gated_rms_norm_{fwd,bwd}``), with
fake implementations so that ``torch.compile`` traces through them, and autograd on the forward op. Registering needs
no triton; the kernels are imported when an op first runs."""

import math

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import kernel_op

# A program holds one group of a block of rows in registers; beyond this the registers spill past any use.
MAX_GROUP_SIZE = 65536


def _last_dim_contiguous(tensor):
    """The kernels step through a row with stride 1 and between rows with any stride."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


@kernel_op("ssm_hub::gated_rms_norm_fwd", mutates_args=())
@on_input_device
def gated_rms_norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor | None,
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [..., D], rstd [rows, G] float32), rows = the product of x's leading dims. y is in ``out_dtype``,
    by default the dtype promoted from x's and weight's: a caller that feeds y to a bfloat16 matmul asks for that and
    saves writing float32 only to cast it."""
    from ssm_hub.kernels.gated_rms_norm import gated_rms_norm_fwd

    return gated_rms_norm_fwd(
        _last_dim_contiguous(x), weight.contiguous(), _last_dim_contiguous(gate), n_groups, eps, norm_before_gate,
        out_dtype=out_dtype,
    )


@gated_rms_norm_fwd_op.register_fake
def _(x, weight, gate, n_groups, eps, norm_before_gate, out_dtype=None):
    rows = math.prod(x.shape[:-1])
    out = x.new_empty(x.shape, dtype=out_dtype or torch.promote_types(x.dtype, weight.dtype))
    return out, x.new_empty((rows, n_groups), dtype=torch.float32)


@kernel_op("ssm_hub::gated_rms_norm_bwd", mutates_args=())
@on_input_device
def gated_rms_norm_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor | None,
    rstd: torch.Tensor,
    n_groups: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dgate, dweight) in the dtypes of x, gate and weight; dgate has no elements when gate is None."""
    from ssm_hub.kernels.gated_rms_norm import gated_rms_norm_bwd

    return gated_rms_norm_bwd(
        _last_dim_contiguous(grad_out), _last_dim_contiguous(x), weight.contiguous(), _last_dim_contiguous(gate),
        rstd.contiguous(), n_groups, norm_before_gate,
    )


@gated_rms_norm_bwd_op.register_fake
def _(grad_out, x, weight, gate, rstd, n_groups, norm_before_gate):
    grad_gate = gate.new_empty(gate.shape) if gate is not None else x.new_empty((0,))
    return x.new_empty(x.shape), grad_gate, weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, gate, n_groups, _, norm_before_gate, _ = inputs
    ctx.save_for_backward(x, weight, gate, output[1])
    ctx.n_groups = n_groups
    ctx.norm_before_gate = norm_before_gate


def _backward(ctx, grad_out, _grad_rstd):
    x, weight, gate, rstd = ctx.saved_tensors
    grad_x, grad_gate, grad_weight = gated_rms_norm_bwd_op(
        grad_out, x, weight, gate, rstd, ctx.n_groups, ctx.norm_before_gate
    )
    return grad_x, grad_weight, grad_gate if gate is not None else None, None, None, None, None


gated_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("ssm_hub::add_rms_norm_fwd", mutates_args=())
@on_input_device
def add_rms_norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (RMSNorm of (x + residual) in x's dtype, x + residual). No backward: ``add_rms_norm`` sends it only
    calls that need no gradient."""
    from ssm_hub.kernels.gated_rms_norm import gated_rms_norm_fwd

    out, _, total = gated_rms_norm_fwd(
        _last_dim_contiguous(x), weight.contiguous(), None, 1, eps, False, residual=_last_dim_contiguous(residual)
    )
    return out, total


@add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype)))
