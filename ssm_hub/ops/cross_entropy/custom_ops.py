"""The cross-entropy kernels registered as torch custom ops (``torch.ops.ssm_hub.cross_entropy_{fwd,bwd}``), with
fake implementations so that ``torch.compile`` traces through them, and autograd on the forward op. Registering needs
no triton; the kernels are imported when an op first runs."""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import kernel_op


@kernel_op("ssm_hub::cross_entropy_fwd", mutates_args=())
@on_input_device
def cross_entropy_fwd_op(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V], targets [N] -> (loss [N] float32, lse [N] float32)."""
    from ssm_hub.kernels.cross_entropy import cross_entropy_fwd

    return cross_entropy_fwd(logits.contiguous(), targets.contiguous(), ignore_index)


@cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index):
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows,), dtype=torch.float32)


@kernel_op("ssm_hub::cross_entropy_bwd", mutates_args=())
@on_input_device
def cross_entropy_bwd_op(
    grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The gradient of the forward's loss for ``grad_loss`` [N]: [N, V] in the logits' dtype."""
    from ssm_hub.kernels.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(grad_loss.contiguous(), logits.contiguous(), targets.contiguous(), lse, ignore_index)


@cross_entropy_bwd_op.register_fake
def _(grad_loss, logits, targets, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_bwd_op(grad_loss, logits, targets, lse, ctx.ignore_index), None, None


cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)
