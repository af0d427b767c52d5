"""Pure-torch RMSNorm, grouped and optionally gated (Mamba-2's ``norm(y * silu(z))``): the specification that every
``gated_rms_norm`` backend must match.

Notation: x [..., D], its D channels cut into G groups of K = D / G; gate z [..., D] (optional); weight w [D]. For
every row and group, with s = silu(z) = z * sigmoid(z):

    h = x * s                       (norm_before_gate=False; h = x when norm_before_gate=True or without a gate)
    r = 1 / sqrt(mean_K(h^2) + eps)                              one number per (row, group)
    n = h * r                       (times s when norm_before_gate=True)
    y = w * n                       n rounded to x's dtype first

With one group and no gate this is the RMSNorm of Llama and Mamba. Everything up to n is computed in float32 (float64
when an input is float64) and n is rounded to x's dtype before it meets w, as transformers' RMSNorm does; y has the
dtype torch promotes x's and w's dtypes to.

Backward (autograd derives it from the code below; the kernels implement it directly). With xhat = h * r and
g = dy * w the gradient reaching n:

    dw   = sum over rows of dy * n
    gx   = g * s                    (norm_before_gate=True; gx = g otherwise)    gradient reaching xhat
    dh   = r * (gx - xhat * mean_K(gx * xhat))                                   since dr/dh_j = -r^3 h_j / K
    dx   = dh * s                   (norm_before_gate=False with a gate; dx = dh otherwise)
    dz   = dh * x * silu'(z)        (norm_before_gate=False)
    dz   = g * xhat * silu'(z)      (norm_before_gate=True)
    silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))

The rounding of n to x's dtype is treated as the identity in backward, as autograd treats a dtype cast.
"""

import torch
import torch.nn.functional as F

from ssm_hub.ops.varlen import compute_dtype


def check_inputs(x, weight, gate, n_groups, eps) -> None:
    """Shapes of one gated RMSNorm call; ValueError naming the argument."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape [..., D] with D >= 1, got {shape}")
    dim = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (dim,) or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating-point tensor of shape [D] = ({dim},), got {shape}")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.shape != x.shape or not gate.is_floating_point():
            shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(f"gate must be None or a floating-point tensor of x's shape {tuple(x.shape)}, got {shape}")
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1 or dim % n_groups != 0:
        raise ValueError(f"n_groups must be a positive integer that divides D={dim}, got {n_groups!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def gated_rms_norm_ref(x, weight, gate=None, n_groups=1, eps=1e-5, norm_before_gate=False):
    """RMSNorm of x over groups of D / n_groups channels, optionally gated by silu(gate).

    Args:
        x: [..., D]. weight: [D]. gate: [..., D] or None.
        n_groups: G, dividing D; each group of K = D / G channels is normalised on its own.
        eps: added to the mean square. norm_before_gate: ``norm(x) * silu(gate)`` instead of ``norm(x * silu(gate))``.

    Returns:
        y [..., D], in the dtype torch promotes x's and weight's dtypes to.
    """
    check_inputs(x, weight, gate, n_groups, eps)
    input_dtype = x.dtype
    dtype = compute_dtype(x, weight, gate)

    # 1. Gate before the norm (Mamba-2's default): h = x * silu(z).
    hidden = x.to(dtype)
    if gate is not None:
        gate = F.silu(gate.to(dtype))
        if not norm_before_gate:
            hidden = hidden * gate

    # 2. Divide each group of K channels by its root mean square: [..., D] -> [..., G, K] -> [..., D].
    grouped = hidden.unflatten(-1, (n_groups, -1))
    variance = grouped.pow(2).mean(-1, keepdim=True)
    hidden = (grouped * torch.rsqrt(variance + eps)).flatten(-2)

    # 3. Or gate after it.
    if gate is not None and norm_before_gate:
        hidden = hidden * gate

    # 4. Scale, after rounding to the input's dtype.
    return weight * hidden.to(input_dtype)


def add_rms_norm_ref(x, residual, weight, eps=1e-5):
    """A pre-norm block's residual step: ``total = residual + x`` (x [..., D] a branch's output, residual [..., D]
    the stream, often float32), then the RMSNorm of ``total`` rounded to weight's dtype, as the next branch reads it.
    Returns (normed [..., D], total)."""
    total = residual + x
    return gated_rms_norm_ref(total.to(weight.dtype), weight, eps=eps), total

