"""Mamba-2's decode step on the kernels, as one op: (the block's residual add and RMSNorm,) in_proj and the causal
conv1d's step -> SSD step -> gated RMSNorm and out_proj, for one token of one sequence.

    from ssm_hub.ops.mamba2_decode import PreNorm, mamba2_decode_on_kernels, mamba2_decode_step
    if mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes):
        out = mamba2_decode_step(hidden, conv_state, ssm_state, weights, sizes)   # both states updated in place
    # or, in a pre-norm block, from the previous block's output and the residual stream:
    out, residual = mamba2_decode_step(previous_out, conv_state, ssm_state, weights, sizes,
                                       PreNorm(residual, norm.weight, norm.variance_epsilon))

It adds no math: the kernels are those that ``add_rms_norm``, ``linear_conv_step``, ``ssd_step(in_place=True)`` and
``gated_rms_norm_linear`` launch on one row, the first two as one (tests/kernels/test_mamba2_decode_step.py compares
them). What it saves is host time. Each of those ops checks its arguments, resolves its backend and goes through its
custom op on every call, and the mixer splits and views their results in between: about 0.25 ms of Python a layer,
which an eager decode step of a 24-layer model pays 24 times for 0.4 ms of GPU work. Here the checks run once per
call, against the shapes the mixer's sizes fix, and three launches follow each other directly.

Registered as a custom op (writing both states) so that ``torch.compile`` and CUDA-graph capture see one node.
"""

from typing import NamedTuple

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import PLAIN_TENSOR_TYPES, contiguous, kernel_op
from ssm_hub.ops.linear.custom_ops import NORMED_GEMV_MAX_FEATURES
from ssm_hub.ops.mamba2_sequence import Mamba2Sizes

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


class Mamba2DecodeWeights(NamedTuple):
    """The mixer's tensors a decode step reads; biases may be None, ``D`` is [H] or [H, P]."""

    in_weight: torch.Tensor
    in_bias: torch.Tensor | None
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    A_log: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor
    norm_weight: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None


class PreNorm(NamedTuple):
    """A pre-norm block's step in front of the mixer, as ``add_rms_norm(hidden, residual, weight, eps)``: the residual
    stream [same shape as hidden] (any float dtype) and the block norm's weight and eps."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float


def mamba2_decode_on_kernels(hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                             weights: Mamba2DecodeWeights, sizes: Mamba2Sizes, pre_norm: PreNorm | None = None) -> bool:
    """Whether :func:`mamba2_decode_step` runs this call: one row of ``hidden`` in bf16 or fp16 with every weight in
    that dtype, plain tensors on a device the kernels serve, no gradient and no autocast, norms the projection kernel
    holds in one block, and caches of exactly one row's shape. Anything else (several rows, float32, training, a
    state of another shape, which the ops name in their errors) goes op by op."""
    dtype = hidden.dtype
    if hidden.numel() != hidden.shape[-1] or dtype not in KERNEL_DTYPES:
        return False
    if sizes.intermediate_size > NORMED_GEMV_MAX_FEATURES or torch.is_autocast_enabled(hidden.device.type):
        return False
    grad = torch.is_grad_enabled()
    tensors = [t for t in weights if t is not None]
    residual = pre_norm.residual if pre_norm is not None else None
    if pre_norm is not None:
        if (hidden.shape[-1] > NORMED_GEMV_MAX_FEATURES or type(residual) not in PLAIN_TENSOR_TYPES
                or residual.shape != hidden.shape or not residual.is_floating_point()
                or (grad and residual.requires_grad)):
            return False
        tensors.append(pre_norm.weight)
    for t in (hidden, *tensors):
        if type(t) not in PLAIN_TENSOR_TYPES or (grad and t.requires_grad) or t.dtype != dtype:
            return False
    conv_dim = weights.conv_weight.shape[0]
    state_shape = (1, sizes.num_heads, sizes.head_dim, sizes.state_size)
    if (type(conv_state) not in PLAIN_TENSOR_TYPES or type(ssm_state) not in PLAIN_TENSOR_TYPES
            or tuple(conv_state.shape) != (1, conv_dim, weights.conv_weight.shape[1] - 1)
            or tuple(ssm_state.shape) != state_shape):
        return False
    return resolve_backend("mamba2_decode_step", "auto", hidden, residual, conv_state, ssm_state, *tensors) == "triton"


def mamba2_decode_step(hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                       weights: Mamba2DecodeWeights, sizes: Mamba2Sizes, pre_norm: PreNorm | None = None):
    """out_proj(norm(ssd_step(conv_step(in_proj(hidden))), gate)) for hidden [1, 1, D] (or [1, D]), the same shape
    out; ``conv_state`` [1, C, K - 1] and ``ssm_state`` [1, H, P, N] advanced by this token in place. With
    ``pre_norm``, in_proj reads ``add_rms_norm(hidden, *pre_norm)``'s normed output instead, and the sum (the residual
    stream entering this block) comes back too: (out, residual + hidden). Only for calls that
    :func:`mamba2_decode_on_kernels` accepts."""
    residual, norm_weight, eps = pre_norm if pre_norm is not None else (None, None, 0.0)
    out, total = _mamba2_decode_step_triton(
        hidden.reshape(-1), residual.reshape(-1) if residual is not None else None, norm_weight, float(eps),
        conv_state, ssm_state, *weights, sizes.intermediate_size, sizes.n_groups, sizes.state_size,
        float(sizes.dt_limit[0]), float(sizes.dt_limit[1]), sizes.norm_groups, float(sizes.norm_eps),
        bool(sizes.norm_before_gate),
    )
    out = out.view(*hidden.shape[:-1], out.shape[-1])
    return out if pre_norm is None else (out, total.view(hidden.shape))


@kernel_op("ssm_hub::mamba2_decode_step", mutates_args=("conv_state", "ssm_state"))
@on_input_device
def _mamba2_decode_step_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    pre_norm_weight: torch.Tensor | None,
    pre_norm_eps: float,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    in_weight: torch.Tensor,
    in_bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    A_log: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    intermediate_size: int,
    n_groups: int,
    state_size: int,
    dt_min: float,
    dt_max: float,
    norm_groups: int,
    norm_eps: float,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [D] -> (out [D_out], residual + hidden [D], or an empty tensor without a residual): the three launches
    (see module)."""
    from ssm_hub.kernels.gemv import gemv_fwd
    from ssm_hub.kernels.ssd_step import ssd_step_fwd

    (hidden, residual, pre_norm_weight, in_weight, in_bias, conv_bias, A_log, D, dt_bias, norm_weight, out_weight,
     out_bias) = contiguous(hidden, residual, pre_norm_weight, in_weight, in_bias, conv_bias, A_log, D, dt_bias,
                            norm_weight, out_weight, out_bias)
    # in_proj's columns: gate z [d_inner], conv input xBC [d_inner + 2 G N], dt [H].
    pre_norm = (None, pre_norm_weight, 1, pre_norm_eps, False) if residual is not None else None
    projected, xBC, *total = gemv_fwd(hidden, in_weight, in_bias, norm=pre_norm,
                                      conv=(conv_state[0], conv_weight, conv_bias, intermediate_size, True),
                                      residual=residual)
    _, heads, head_dim, _ = ssm_state.shape
    groups = n_groups * state_size
    x, B, C = xBC.split([intermediate_size, groups, groups])
    dt = projected[intermediate_size + xBC.shape[0]:]
    y, _ = ssd_step_fwd(ssm_state, x.view(1, heads, head_dim), dt.view(1, heads), A_log,
                        B.view(1, n_groups, state_size), C.view(1, n_groups, state_size), D, None, dt_bias, True,
                        dt_min, dt_max, None, A_is_log=True, in_place=True)
    gate = projected[:intermediate_size]
    out = gemv_fwd(y.view(-1), out_weight, out_bias, norm=(gate, norm_weight, norm_groups, norm_eps, norm_before_gate))
    return out, total[0] if total else hidden.new_empty(0)


@_mamba2_decode_step_triton.register_fake
def _(hidden, residual, pre_norm_weight, pre_norm_eps, conv_state, ssm_state, in_weight, in_bias, conv_weight,
      conv_bias, A_log, D, dt_bias, norm_weight, out_weight, out_bias, intermediate_size, n_groups, state_size, dt_min,
      dt_max, norm_groups, norm_eps, norm_before_gate):
    total = (hidden.new_empty(hidden.shape, dtype=torch.promote_types(hidden.dtype, residual.dtype))
             if residual is not None else hidden.new_empty(0))
    return hidden.new_empty((out_weight.shape[0],)), total
