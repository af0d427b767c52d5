"""Gated, grouped RMSNorm (RMSNorm when ungated with one group): the public op and its one dispatch point. The math
is in ``reference.py``."""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.gated_rms_norm.reference import add_rms_norm_ref, check_inputs, gated_rms_norm_ref
from ssm_hub.ops.gated_rms_norm.custom_ops import MAX_GROUP_SIZE, add_rms_norm_fwd_op, gated_rms_norm_fwd_op
from ssm_hub.ops.recompute import call_recomputing_in_backward

__all__ = ["gated_rms_norm", "gated_rms_norm_ref", "add_rms_norm", "add_rms_norm_ref"]


def gated_rms_norm(x, weight, gate=None, n_groups=1, eps=1e-5, norm_before_gate=False, backend="auto"):
    """RMSNorm of x [..., D] over n_groups groups of channels, scaled by weight [D], optionally gated by
    silu(gate [..., D]) before (``norm_before_gate=False``) or after the norm.

    Arguments and returns as :func:`ssm_hub.ops.gated_rms_norm.reference.gated_rms_norm_ref`; ``backend`` is
    "auto", "triton" or "torch" (see ``ssm_hub.backend``). The Triton kernel holds one group of a row in registers,
    so it takes groups of up to ``MAX_GROUP_SIZE`` channels; "auto" runs larger ones in torch. x and gate may be
    views with any row strides (a split of a projection's output).
    """
    check_inputs(x, weight, gate, n_groups, eps)
    supported = x.shape[-1] // n_groups <= MAX_GROUP_SIZE
    if resolve_backend("gated_rms_norm", backend, x, weight, gate, has_triton_kernel=supported) == "triton":
        out, _ = gated_rms_norm_fwd_op(x, weight, gate, n_groups, float(eps), bool(norm_before_gate))
        return out
    kwargs = dict(gate=gate, n_groups=n_groups, eps=eps, norm_before_gate=norm_before_gate)
    return call_recomputing_in_backward(gated_rms_norm_ref, (x, weight), kwargs)


def add_rms_norm(x, residual, weight, eps=1e-5, backend="auto"):
    """A pre-norm block's residual step, ``total = residual + x``, and the RMSNorm of ``total`` (rounded to weight's
    dtype) that the next branch reads: (normed [..., D], total [..., D]); math in
    :func:`ssm_hub.ops.gated_rms_norm.reference.add_rms_norm_ref`.

    The kernel does both in one pass (one launch instead of an add, a cast and the norm) when no gradient is needed
    and x has weight's dtype (decoding, and prefill or evaluation without gradients); otherwise the sum is a torch add
    and the norm :func:`gated_rms_norm`.
    """
    if x.shape != residual.shape:
        raise ValueError(f"x and residual must have the same shape, got {tuple(x.shape)} and {tuple(residual.shape)}")
    tensors = (x, residual, weight)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    supported = x.dtype == weight.dtype and x.shape[-1] <= MAX_GROUP_SIZE and not needs_grad
    if (supported or backend != "auto") and resolve_backend(
            "add_rms_norm", backend, *tensors, has_triton_kernel=supported) == "triton":
        check_inputs(x, weight, None, 1, eps)  # the torch path's gated_rms_norm checks them itself
        return add_rms_norm_fwd_op(x, residual, weight, float(eps))
    total = residual + x
    return gated_rms_norm(total.to(weight.dtype), weight, eps=eps, backend=backend), total

