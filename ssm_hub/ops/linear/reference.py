"""Pure-torch linear layer and SwiGLU projections: the specification that every ``linear`` / ``swiglu_linear``
backend must match.

Notation: x [..., K], weight W [N, K], bias b [N] (optional), as ``torch.nn.Linear`` stores them.

    linear:                 y = x W^T + b
    swiglu_linear:          y = silu(x W_gate^T + b_gate) * (x W_up^T + b_up),   silu(a) = a * sigmoid(a)
    gated_rms_norm_linear:  y = gated_rms_norm(x, w_norm, z) W^T + b             (ssm_hub.ops.gated_rms_norm)
    linear_conv_step:       y = x W^T + b, and the causal conv1d's decode step on y[..., s:s + C]

y [..., N] has x's dtype. This is ``torch.nn.functional.linear``, which rounds each projection to x's dtype before
the gate; the kernel keeps both in float32 up to the one rounding of y, so in bf16 the two differ by a few bf16
steps of y.
"""

import torch
import torch.nn.functional as F

from ssm_hub.ops.causal_conv1d.reference import causal_conv1d_step_ref
from ssm_hub.ops.gated_rms_norm.reference import gated_rms_norm_ref


def check_inputs(x, weight, bias, up_weight=None, up_bias=None) -> None:
    """Shapes and dtypes of one call; ValueError naming the argument."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape [..., K], got {getattr(x, 'shape', type(x))}")
    for name, matrix, vector in (("weight", weight, bias), ("up_weight", up_weight, up_bias)):
        if matrix is None:
            continue
        if matrix.dim() != 2 or matrix.shape[1] != x.shape[-1]:
            raise ValueError(
                f"{name} must have shape [N, {x.shape[-1]}] (x's last dimension), got {tuple(matrix.shape)}")
        if vector is not None and tuple(vector.shape) != (matrix.shape[0],):
            bias_name = name.replace("weight", "bias")
            raise ValueError(f"{bias_name} must have shape [{matrix.shape[0]}], got {tuple(vector.shape)}")
    if up_weight is not None and up_weight.shape != weight.shape:
        raise ValueError(f"up_weight must have weight's shape {tuple(weight.shape)}, got {tuple(up_weight.shape)}")
    if up_weight is None and up_bias is not None:
        raise ValueError("up_bias was given without up_weight")


def linear_ref(x, weight, bias=None):
    """x [..., K], weight [N, K], bias [N] or None -> x W^T + b [..., N]."""
    return F.linear(x, weight, bias)


def swiglu_linear_ref(x, gate_weight, up_weight, gate_bias=None, up_bias=None):
    """x [..., K], gate_weight and up_weight [N, K], biases [N] or None -> silu(x W_gate^T + b) * (x W_up^T + b)."""
    return F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)


def gated_rms_norm_linear_ref(x, gate, norm_weight, weight, bias=None, n_groups=1, eps=1e-5, norm_before_gate=False):
    """x and gate [..., K], norm_weight [K], weight [N, K], bias [N] or None -> the gated RMSNorm of x (as
    ``gated_rms_norm_ref``) projected, [..., N] in the normed output's dtype."""
    return F.linear(gated_rms_norm_ref(x, norm_weight, gate, n_groups, eps, norm_before_gate), weight, bias)


def linear_conv_step_ref(x, weight, bias, conv_state, conv_weight, conv_bias=None, conv_start=0, activation=None):
    """x [B, 1, K] or [B, K] -> (y = x W^T + b [..., N], conv_out [B, C], new_conv_state [B, C, K_conv - 1]): the
    causal conv1d's decode step (``causal_conv1d_step_ref``) on y's channels conv_start .. conv_start + C - 1 against
    ``conv_state`` [B, C, K_conv - 1]. Pure: ``conv_state`` is not modified."""
    y = F.linear(x, weight, bias)
    channels = conv_weight.shape[0]
    conv_in = y[..., conv_start:conv_start + channels].reshape(conv_state.shape[0], channels)
    conv_out, new_state = causal_conv1d_step_ref(conv_in, conv_state, conv_weight, conv_bias, activation)
    return y, conv_out, new_state
