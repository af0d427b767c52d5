"""The causal conv1d kernels registered as torch custom ops: the sequence forward and backward
(``torch.ops.ssm_hub.causal_conv1d_{fwd,bwd}``, with autograd) and the decode step (``causal_conv1d_step``, and
``causal_conv1d_step_`` that writes the new window over ``conv_state``), with fake implementations so that
``torch.compile`` traces through them without graph breaks. Registering needs no triton; the kernels are imported
when an op first runs.

The forward always returns the final state (a tiny [B or S, C, K - 1] tensor): the public op drops it when it was
not asked for. Like the reference's, the final state is differentiable: it is made of inputs and initial-state
slots, and its gradient flows back into them.
"""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import contiguous, kernel_op
from ssm_hub.ops.varlen import num_states


@kernel_op("ssm_hub::causal_conv1d_fwd", mutates_args=())
@on_input_device
def causal_conv1d_fwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, C], final_state [B or S, C, K - 1]), both in x's dtype."""
    from ssm_hub.kernels.causal_conv1d import causal_conv1d_fwd

    (bias,) = contiguous(bias)
    return causal_conv1d_fwd(x, weight, bias, initial_state, seq_idx, cu_seqlens, silu)


@causal_conv1d_fwd_triton.register_fake
def _(x, weight, bias, initial_state, seq_idx, cu_seqlens, silu):
    final = x.new_empty((num_states(x.shape[0], cu_seqlens), x.shape[2], weight.shape[1] - 1))
    return x.new_empty(x.shape), final


@kernel_op("ssm_hub::causal_conv1d_bwd", mutates_args=())
@on_input_device
def causal_conv1d_bwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    silu: bool,
    dy: torch.Tensor,
    dfinal_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, d_initial_state). dbias is float32 [C] when there is no bias; d_initial_state is an
    empty tensor when there is no initial state."""
    from ssm_hub.kernels.causal_conv1d import causal_conv1d_bwd

    (bias,) = contiguous(bias)
    dx, dweight, dbias, dstate = causal_conv1d_bwd(
        x, weight, bias, initial_state, seq_idx, cu_seqlens, silu, dy, dfinal_state
    )
    return dx, dweight, dbias, dstate if dstate is not None else x.new_empty(0)


@causal_conv1d_bwd_triton.register_fake
def _(x, weight, bias, initial_state, seq_idx, cu_seqlens, silu, dy, dfinal_state):
    dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(x.shape[2], dtype=torch.float32)
    dstate = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias, dstate


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, seq_idx, cu_seqlens, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, seq_idx, cu_seqlens)
    ctx.silu = silu


def _backward(ctx, dy, dfinal_state):
    x, weight, bias, initial_state, seq_idx, cu_seqlens = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dweight, dbias, dstate = causal_conv1d_bwd_triton(
        x, weight, bias, initial_state, seq_idx, cu_seqlens, ctx.silu, dy, dfinal_state
    )
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dweight if needs[1] else None,
        dbias if bias is not None and needs[2] else None,
        dstate if initial_state is not None and needs[3] else None,
        None,
        None,
        None,
    )


causal_conv1d_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("ssm_hub::causal_conv1d_step", mutates_args=())
@on_input_device
def causal_conv1d_step_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    state_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.causal_conv1d_step import causal_conv1d_step_fwd

    bias, state_indices = contiguous(bias, state_indices)
    return causal_conv1d_step_fwd(x, conv_state, weight, bias, activation == "silu", state_indices)


@causal_conv1d_step_triton.register_fake
def _(x, conv_state, weight, bias, activation, state_indices):
    batch, channels = x.shape
    return torch.empty_like(x), conv_state.new_empty((batch, channels, weight.shape[1] - 1))


@kernel_op("ssm_hub::causal_conv1d_step_", mutates_args=("conv_state",))
@on_input_device
def causal_conv1d_step_in_place_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    state_indices: torch.Tensor | None,
) -> torch.Tensor:
    from ssm_hub.kernels.causal_conv1d_step import causal_conv1d_step_fwd

    bias, state_indices = contiguous(bias, state_indices)
    return causal_conv1d_step_fwd(x, conv_state, weight, bias, activation == "silu", state_indices, in_place=True)[0]


@causal_conv1d_step_in_place_triton.register_fake
def _(x, conv_state, weight, bias, activation, state_indices):
    return torch.empty_like(x)
