"""The in-place form of the decode-step ops: the new state written over the state it came from.

A decode step against a cache reads each row's state and writes the next one. Written in place, the cache needs
no copy afterwards; with ``state_indices`` (continuous batching) row b goes back to slot ``state_indices[b]`` of
the pool. The torch path writes the reference's result this way; the kernels write it directly.
"""

import torch


def write_new_state(state: torch.Tensor, new_state: torch.Tensor, state_indices: torch.Tensor | None) -> torch.Tensor:
    """Copy ``new_state`` [B, ...] over ``state`` (row b over slot ``state_indices[b]``, else slot b), in
    ``state``'s dtype; returns ``state``. The slots must be distinct: for a slot named twice, which row's state
    lands there is undefined in the kernels."""
    new_state = new_state.to(state.dtype)
    if state_indices is None:
        return state.copy_(new_state)
    return state.index_copy_(0, state_indices.to(torch.long), new_state)
