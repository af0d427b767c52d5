"""Linear layers, SwiGLU's projections, a projection of a gated RMSNorm's output and a projection followed by the
causal conv1d's decode step on part of it: ``linear``, ``swiglu_linear``, ``gated_rms_norm_linear`` and
``linear_conv_step``, the public ops and their one dispatch point. The math is in ``reference.py``.

The Triton kernel (a matrix-vector product, kernels/gemv.py) covers what decoding one sequence runs: one row (one
token), bf16 or fp16, no gradient needed. On more rows cuBLAS is as fast or faster (benchmarks/timing/gemv.py measured 2
to 8 rows on an H100). Everything else (training, prefill, float32) is ``torch.nn.functional.linear``, that is cuBLAS,
under "auto" and ``SSM_HUB_BACKEND=triton`` alike: an ordinary linear layer has no kernel of ours to force. Only an
explicit ``backend="triton"`` insists, and is refused for what the kernel does not cover.
"""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.causal_conv1d import causal_conv1d_step
from ssm_hub.ops.causal_conv1d.reference import check_step_inputs
from ssm_hub.ops.gated_rms_norm import gated_rms_norm
from ssm_hub.ops.gated_rms_norm.reference import check_inputs as check_norm_inputs
from ssm_hub.ops.linear.reference import (
    check_inputs,
    gated_rms_norm_linear_ref,
    linear_conv_step_ref,
    linear_ref,
    swiglu_linear_ref,
)
from ssm_hub.ops.linear.custom_ops import (
    NORMED_GEMV_MAX_FEATURES,
    gated_rms_norm_gemv_triton,
    gemv_conv_step_triton,
    gemv_triton,
)

__all__ = ["linear", "swiglu_linear", "gated_rms_norm_linear", "linear_conv_step", "linear_ref", "swiglu_linear_ref",
           "gated_rms_norm_linear_ref", "linear_conv_step_ref"]

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _kernel_supports(x, *params) -> bool:
    """One row of plain tensors in one half dtype, no gradient, no autocast (which would pick the output dtype):
    tensor subclasses (quantized or sharded weights) stay with torch. The row count goes first: it turns away
    training and prefill calls at once."""
    if x.dim() == 0 or x.numel() != x.shape[-1] or x.numel() == 0 or x.dtype not in KERNEL_DTYPES:
        return False
    tensors = [t for t in (x, *params) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (all(t.dtype == x.dtype and type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
            and not needs_grad and not torch.is_autocast_enabled(x.device.type))


def _one_row(x, weight, bias, up_weight, up_bias):
    out = gemv_triton(x.reshape(-1), weight, bias, up_weight, up_bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x, weight, bias=None, backend="auto"):
    """x [..., K] W^T + b -> [..., N], as ``torch.nn.functional.linear``. ``backend`` is "auto", "triton" or
    "torch" (see ``ssm_hub.backend``); the kernel takes one row in bf16 / fp16 without gradients."""
    supported = _kernel_supports(x, weight, bias)
    if not supported and backend == "auto":  # training, prefill, float32: F.linear, which checks its own shapes
        return linear_ref(x, weight, bias)
    check_inputs(x, weight, bias)
    if resolve_backend("linear", backend, x, weight, bias, has_triton_kernel=supported) == "triton":
        return _one_row(x, weight, bias, None, None)
    return linear_ref(x, weight, bias)


def swiglu_linear(x, gate_weight, up_weight, gate_bias=None, up_bias=None, backend="auto"):
    """silu(x W_gate^T + b_gate) * (x W_up^T + b_up) [..., N]: the two input projections of a SwiGLU feed-forward
    and its gate, in one kernel under the same conditions as :func:`linear`."""
    supported = _kernel_supports(x, gate_weight, up_weight, gate_bias, up_bias)
    if not supported and backend == "auto":
        return swiglu_linear_ref(x, gate_weight, up_weight, gate_bias, up_bias)
    check_inputs(x, gate_weight, gate_bias, up_weight, up_bias)
    if resolve_backend("swiglu_linear", backend, x, gate_weight, up_weight, has_triton_kernel=supported) == "triton":
        return _one_row(x, gate_weight, gate_bias, up_weight, up_bias)
    return swiglu_linear_ref(x, gate_weight, up_weight, gate_bias, up_bias)


def gated_rms_norm_linear(x, gate, norm_weight, weight, bias=None, n_groups=1, eps=1e-5, norm_before_gate=False,
                          backend="auto"):
    """linear(gated_rms_norm(x, norm_weight, gate, n_groups, eps, norm_before_gate), weight, bias): Mamba-2's
    out_proj of its normed output. On one row in one half dtype without gradients (as :func:`linear`'s kernel, for
    rows of up to 4096 channels) the norm runs inside the matrix-vector kernel, which saves the norm's launch in a
    decode step; otherwise it is the two ops one after the other."""
    supported = _kernel_supports(x, gate, norm_weight, weight, bias) and x.shape[-1] <= NORMED_GEMV_MAX_FEATURES
    if not supported and backend == "auto":
        normed = gated_rms_norm(x, norm_weight, gate, n_groups=n_groups, eps=eps, norm_before_gate=norm_before_gate)
        return linear(normed, weight, bias)
    check_norm_inputs(x, norm_weight, gate, n_groups, eps)
    check_inputs(x, weight, bias)
    if resolve_backend("gated_rms_norm_linear", backend, x, gate, norm_weight, weight, bias,
                       has_triton_kernel=supported) == "triton":
        out = gated_rms_norm_gemv_triton(x.reshape(-1), gate.reshape(-1) if gate is not None else None, norm_weight,
                                         n_groups, float(eps), bool(norm_before_gate), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return gated_rms_norm_linear_ref(x, gate, norm_weight, weight, bias, n_groups, eps, norm_before_gate)


def linear_conv_step(x, weight, bias, conv_state, conv_weight, conv_bias=None, conv_start=0, activation=None,
                     backend="auto"):
    """A projection and the causal conv1d's decode step on part of it, Mamba-2's in_proj and conv when decoding:
    x [B, 1, K] or [B, K] -> (x W^T + b [..., N], the step's output [B, C] on channels conv_start .. conv_start + C
    - 1 of the projection), with ``conv_state`` [B, C, K_conv - 1] shifted by this token in place, as
    ``causal_conv1d_step(..., in_place=True)``. Math in :func:`ssm_hub.ops.linear.reference.linear_conv_step_ref`.

    On one row under the conditions of :func:`linear`'s kernel, one kernel does both: each program steps the conv
    channels among its output columns. Otherwise :func:`linear`, then :func:`causal_conv1d_step` in place."""
    rows = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] > 0 else 0
    conv_tensors = [t for t in (conv_state, conv_weight, conv_bias) if t is not None]
    supported = (rows == 1 and _kernel_supports(x, weight, bias)
                 and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in conv_tensors)
                 and not (torch.is_grad_enabled() and any(t.requires_grad for t in conv_tensors)))
    channels = conv_weight.shape[0] if isinstance(conv_weight, torch.Tensor) and conv_weight.dim() == 2 else -1
    if supported or backend != "auto":
        check_inputs(x, weight, bias)
        if not 0 <= conv_start or conv_start + channels > weight.shape[0]:
            raise ValueError(f"the conv channels {conv_start} .. {conv_start + channels - 1} must lie within the "
                             f"projection's {weight.shape[0]} outputs")
        check_step_inputs(torch.empty((rows, channels), dtype=x.dtype, device="meta"), conv_state, conv_weight,
                          conv_bias, activation, None)
        if resolve_backend("linear_conv_step", backend, x, weight, bias, *conv_tensors,
                           has_triton_kernel=supported) == "triton":
            projected, conv_out = gemv_conv_step_triton(x.reshape(-1), weight, bias, conv_state[0], conv_weight,
                                                        conv_bias, conv_start, activation == "silu")
            return projected.view(*x.shape[:-1], weight.shape[0]), conv_out[None]
    # Each op dispatches on its own: several rows, float32 or gradients run cuBLAS and the conv step's kernel.
    projected = linear(x, weight, bias, backend=backend)
    conv_out, _ = causal_conv1d_step(projected[..., conv_start:conv_start + channels].reshape(-1, channels),
                                     conv_state, conv_weight, conv_bias, activation=activation, in_place=True,
                                     backend=backend)
    return projected, conv_out
