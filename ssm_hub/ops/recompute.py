"""Trading recomputation for activation memory under autograd.

- :func:`call_recomputing_in_backward` runs a pure-torch reference without keeping its intermediates. The
  references build large intermediates (every Mamba-1 state, SSD's per-chunk decay and score matrices, the conv's
  gathered windows). Left to autograd, each layer would keep them until backward, for all layers at once. Run
  through this, a layer keeps only its inputs and rebuilds the intermediates in its own backward, one layer at a
  time: the price is one extra forward of the op, the gain is what lets a 130M Mamba-2 train at batch 8 x 2048 in
  bf16 on an 80 GB GPU on the pure-torch path.
- :func:`checkpoint_keeping_outputs_of` runs a chain of ops keeping only its inputs and the outputs of the named
  (expensive) ops; the cheap ones in between are recomputed in backward.
"""

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def call_recomputing_in_backward(reference, args: tuple, kwargs: dict):
    """``reference(*args, **kwargs)``, checkpointed when any tensor argument requires grad."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return checkpoint(reference, *args, use_reentrant=False, **kwargs)
    return reference(*args, **kwargs)


def _keep_outputs_of(ops, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_keeping_outputs_of(ops: tuple, function, *args):
    """``function(*args)`` under non-reentrant checkpointing that keeps the outputs of ``ops`` (OpOverloads, such
    as a scan kernel's custom op) and recomputes everything else in backward. Outside autograd it is a plain call."""
    if not torch.is_grad_enabled():
        return function(*args)
    policy = partial(_keep_outputs_of, ops)
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, policy))
