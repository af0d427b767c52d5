"""The causal conv1d decode-step kernel registered as torch custom ops (``torch.ops.ssm_hub.causal_conv1d_step``,
and ``causal_conv1d_step_`` that writes the new window over ``conv_state``), with fake implementations so that ``torch.compile`` traces through it without graph breaks. Registering needs no
triton; the kernel is imported when the op first runs."""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import kernel_op


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

    bias, state_indices = [t.contiguous() if t is not None else None for t in (bias, state_indices)]
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

    bias, state_indices = [t.contiguous() if t is not None else None for t in (bias, state_indices)]
    return causal_conv1d_step_fwd(x, conv_state, weight, bias, activation == "silu", state_indices, in_place=True)[0]


@causal_conv1d_step_in_place_triton.register_fake
def _(x, conv_state, weight, bias, activation, state_indices):
    return torch.empty_like(x)
