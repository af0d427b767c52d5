"""Pure-torch per-token cross-entropy of logits against target ids: the specification that every ``cross_entropy``
backend must match.

For a row x [V] of logits and its target t:

    lse  = log sum_j exp(x_j)                 in float32 (float64 for float64 logits)
    loss = lse - x_t                          0 where t == ignore_index

and its gradient for an upstream gradient g of the row's loss is g * (softmax(x) - onehot(t)), 0 for ignored rows.
This is ``torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")``, the computation
transformers' ForCausalLMLoss does before it reduces.
"""

import torch
import torch.nn.functional as F


def check_inputs(logits, targets) -> None:
    """Shapes and dtypes of one call; ValueError naming the argument."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor of shape [..., V], got {shape}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.is_complex():
        kind = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of token ids, got {kind}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the shape of logits without the vocabulary dim, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")


def cross_entropy_ref(logits, targets, ignore_index: int = -100) -> torch.Tensor:
    """logits [..., V], targets [...] -> per-token loss [...] in float32 (float64 for float64 logits)."""
    check_inputs(logits, targets)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(-1, logits.shape[-1]).to(dtype)
    loss = F.cross_entropy(flat, targets.reshape(-1).long(), ignore_index=ignore_index, reduction="none")
    return loss.view(targets.shape)
