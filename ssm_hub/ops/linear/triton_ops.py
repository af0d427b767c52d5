"""The matrix-vector kernel registered as a torch custom op (``torch.ops.ssm_hub.gemv``), with a fake implementation
so that ``torch.compile`` traces through it. It has no backward: the dispatch in ``__init__`` sends it only calls
that need no gradient. Registering needs no triton; the kernel is imported when the op first runs."""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import kernel_op


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

    return gemv_fwd(*[t.contiguous() if t is not None else None for t in (x, weight, bias, up_weight, up_bias)])


@gemv_triton.register_fake
def _(x, weight, bias, up_weight, up_bias):
    return x.new_empty((weight.shape[0],))
