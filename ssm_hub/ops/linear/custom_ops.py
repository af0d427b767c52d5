"""The matrix-vector kernel registered as torch custom ops (``torch.ops.ssm_hub.gemv``;
``torch.ops.ssm_hub.gated_rms_norm_gemv`` with the gated RMSNorm of its input in front; ``torch.ops.ssm_hub.gemv_conv_step``
with the causal conv1d's decode step on a range of its outputs behind), with fake implementations so that
``torch.compile`` traces through them. They have no backward: the dispatch in ``__init__`` sends them only
calls that need no gradient. Registering needs no triton; the kernel is imported when the op first runs."""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import contiguous, kernel_op


@kernel_op("ssm_hub::gemv", mutates_args=())
@on_input_device
def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    up_weight: torch.Tensor | None,
    up_bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [K] -> [N]: x W^T + b, or silu(x W^T + b) * (x W_up^T + b_up) with up_weight."""
    from ssm_hub.kernels.gemv import gemv_fwd

    return gemv_fwd(*contiguous(x, weight, bias, up_weight, up_bias))


@gemv_triton.register_fake
def _(x, weight, bias, up_weight, up_bias):
    return x.new_empty((weight.shape[0],))


# The normed projection holds the whole row in one block of the kernel (kernels/gemv.py's MAX_BLOCK_K).
NORMED_GEMV_MAX_FEATURES = 4096


@kernel_op("ssm_hub::gated_rms_norm_gemv", mutates_args=())
@on_input_device
def gated_rms_norm_gemv_triton(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    norm_weight: torch.Tensor,
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [K] -> [N]: gated_rms_norm(x, norm_weight, gate) W^T + b."""
    from ssm_hub.kernels.gemv import gemv_fwd

    gate, norm_weight = contiguous(gate, norm_weight)
    return gemv_fwd(*contiguous(x, weight, bias),
                    norm=(gate, norm_weight, n_groups, eps, norm_before_gate))


@gated_rms_norm_gemv_triton.register_fake
def _(x, gate, norm_weight, n_groups, eps, norm_before_gate, weight, bias):
    return x.new_empty((weight.shape[0],))


@kernel_op("ssm_hub::gemv_conv_step", mutates_args=("conv_state",))
@on_input_device
def gemv_conv_step_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    conv_start: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] -> (x W^T + b [N], the conv step's output [C] on outputs conv_start .. conv_start + C - 1); the conv
    window conv_state [C, K_conv - 1] shifted in place."""
    from ssm_hub.kernels.gemv import gemv_fwd

    x, weight, bias, conv_bias = contiguous(x, weight, bias, conv_bias)
    return gemv_fwd(x, weight, bias, conv=(conv_state, conv_weight, conv_bias, conv_start, silu))


@gemv_conv_step_triton.register_fake
def _(x, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu):
    return x.new_empty((weight.shape[0],)), x.new_empty((conv_weight.shape[0],))
