"""Linear layers and SwiGLU's projections: ``linear`` and ``swiglu_linear``, the public ops and their one dispatch
point. The math is in ``reference.py``.

The Triton kernel (a matrix-vector product, kernels/gemv.py) covers what decoding one sequence runs: one row (one
token), bf16 or fp16, no gradient needed. On more rows cuBLAS is as fast or faster (benchmarks/gemv.py measured 2
to 8 rows on an H100). Everything else (training, prefill, float32) is ``torch.nn.functional.linear``, that is cuBLAS,
under "auto" and ``SSM_HUB_BACKEND=triton`` alike: an ordinary linear layer has no kernel of ours to force. Only an
explicit ``backend="triton"`` insists, and is refused for what the kernel does not cover.
"""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.linear.reference import check_inputs, linear_ref, swiglu_linear_ref
from ssm_hub.ops.linear.triton_ops import gemv_triton

__all__ = ["linear", "swiglu_linear", "linear_ref", "swiglu_linear_ref"]

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
