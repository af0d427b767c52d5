"""The selective-scan kernels registered as torch custom ops (``torch.ops.ssm_hub.*``), with fake implementations so
that ``torch.compile`` traces through them without graph breaks. Registering needs no triton; the kernels are
imported when an op first runs.

``selective_scan_fwd`` / ``selective_scan_bwd`` are joined by autograd: the forward always returns the final state (a
small float32 tensor the public op drops when it was not asked for) and the float32 checkpoints the backward restarts
from. Like the reference's, the final state is differentiable: its gradient flows into every input and the initial
state.
"""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import contiguous, kernel_op
from ssm_hub.ops.varlen import num_states


@kernel_op("ssm_hub::selective_scan_step", mutates_args=())
@on_input_device
def selective_scan_step_triton(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    state_indices: torch.Tensor | None,
    A_is_log: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.selective_scan_step import selective_scan_step_fwd

    A, D, delta_bias, state_indices = contiguous(A, D, delta_bias, state_indices)
    return selective_scan_step_fwd(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices,
                                   A_is_log)


@selective_scan_step_triton.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices, A_is_log):
    batch, dim = u.shape
    return torch.empty_like(u), u.new_empty((batch, dim, A.shape[1]), dtype=torch.float32)


@kernel_op("ssm_hub::selective_scan_step_", mutates_args=("state",))
@on_input_device
def selective_scan_step_in_place_triton(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    state_indices: torch.Tensor | None,
    A_is_log: bool,
) -> torch.Tensor:
    from ssm_hub.kernels.selective_scan_step import selective_scan_step_fwd

    A, D, delta_bias, state_indices = contiguous(A, D, delta_bias, state_indices)
    return selective_scan_step_fwd(
        state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices, A_is_log, in_place=True
    )[0]


@selective_scan_step_in_place_triton.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices, A_is_log):
    return torch.empty_like(u)


@kernel_op("ssm_hub::selective_scan_fwd", mutates_args=())
@on_input_device
def selective_scan_fwd_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [B, T, D] in u's dtype, final_state [B or S, D, N] float32, checkpoints): the checkpoints are the float32
    states that the backward restarts from (an empty tensor without ``save_checkpoints``)."""
    from ssm_hub.kernels.selective_scan import selective_scan_fwd

    D, delta_bias = contiguous(D, delta_bias)
    return selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, save_checkpoints
    )


@selective_scan_fwd_triton.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, save_checkpoints):
    from ssm_hub.kernels.selective_scan import checkpoint_shape

    batch, seqlen, dim = u.shape
    state_size = A.shape[1]
    final = u.new_empty((num_states(u.shape[0], cu_seqlens), dim, state_size), dtype=torch.float32)
    shape = checkpoint_shape(batch, seqlen, dim, state_size) if save_checkpoints else (0,)
    return u.new_empty(u.shape), final, u.new_empty(shape, dtype=torch.float32)


@kernel_op("ssm_hub::selective_scan_bwd", mutates_args=())
@on_input_device
def selective_scan_bwd_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    checkpoints: torch.Tensor,
    dy: torch.Tensor,
    dfinal_state: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, d initial_state), each in its input's dtype; an empty tensor
    stands for the gradient of an absent optional input."""
    from ssm_hub.kernels.selective_scan import selective_scan_bwd

    D, delta_bias = contiguous(D, delta_bias)
    grads = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, checkpoints, dy,
        dfinal_state,
    )
    return tuple(grad if grad is not None else u.new_empty(0) for grad in grads)


@selective_scan_bwd_triton.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, checkpoints, dy,
      dfinal_state):
    def like(tensor):
        return tensor.new_empty(tensor.shape) if tensor is not None else u.new_empty(0)

    return tuple(like(t) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dfinal_state, _):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens, checkpoints = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = selective_scan_bwd_triton(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, seq_idx, cu_seqlens, checkpoints,
        dy, dfinal_state,
    )
    # Inputs in the order of the forward's arguments; None where absent or not needed.
    present = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)]
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = (
        grad if tensor is not None and need else None for grad, tensor, need in zip(grads, present, needs)
    )
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dinit, None, None, None


selective_scan_fwd_triton.register_autograd(_backward, setup_context=_setup_context)
