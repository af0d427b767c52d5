"""Per-token cross-entropy of logits against target ids: the public op and its one dispatch point. The math is in
``reference.py``.

The Triton kernels read the logits in their own dtype and write the gradient in it, never a float32 copy of the
logits: at a language model's vocabulary the float32 copy, its log-softmax and their gradients are the largest
tensors of a training step and a tenth of its time.
"""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.cross_entropy.reference import check_inputs, cross_entropy_ref
from ssm_hub.ops.cross_entropy.custom_ops import cross_entropy_fwd_op

__all__ = ["cross_entropy", "cross_entropy_ref"]


def cross_entropy(logits, targets, ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    """logits [..., V], targets [...] -> per-token loss [...] (0 where the target is ``ignore_index``), float32
    (float64 for float64 logits), differentiable in logits.

    ``backend`` is "auto", "triton" or "torch" (see ``ssm_hub.backend``); the kernels take float16, bfloat16 and
    float32 logits, and a target outside [0, V) gives a NaN loss there, where torch raises.
    """
    check_inputs(logits, targets)
    supported = logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if resolve_backend("cross_entropy", backend, logits, targets, has_triton_kernel=supported) == "triton":
        vocab = logits.shape[-1]
        loss, _ = cross_entropy_fwd_op(logits.reshape(-1, vocab), targets.reshape(-1), int(ignore_index))
        return loss.view(targets.shape)
    return cross_entropy_ref(logits, targets, ignore_index)
