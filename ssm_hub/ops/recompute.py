"""Trading recomputation for activation memory under autograd: :func:`call_recomputing_in_backward` runs a
pure-torch reference without keeping its intermediates.

The references build large intermediates (every Mamba-1 state, SSD's per-chunk decay and score matrices, the conv's
gathered windows). Left to autograd, each layer would keep them until backward, for all layers at once. Run through
this, a layer keeps only its inputs and rebuilds the intermediates in its own backward, one layer at a time: the
price is one extra forward of the op, the gain is what lets a 130M Mamba-2 train at batch 8 x 2048 in bf16 on an
80 GB GPU on the pure-torch path. (On the kernels, Mamba-2's training step makes its own trade:
ssm_hub.ops.mamba2_sequence.)
"""

import torch
from torch.utils.checkpoint import checkpoint


def call_recomputing_in_backward(reference, args: tuple, kwargs: dict):
    """``reference(*args, **kwargs)``, checkpointed when any tensor argument requires grad."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return checkpoint(reference, *args, use_reentrant=False, **kwargs)
    return reference(*args, **kwargs)

