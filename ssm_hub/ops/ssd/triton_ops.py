"""The SSD kernels registered as torch custom ops (``torch.ops.ssm_hub.*``), with fake implementations so that
``torch.compile`` traces through them without graph breaks. Registering needs no triton; the kernels are imported
when an op first runs."""

import torch


@torch.library.custom_op("ssm_hub::ssd_step", mutates_args=())
def ssd_step_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    state_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.ssd_step import ssd_step_fwd

    contiguous = [t.contiguous() if t is not None else None for t in (A, D, dt_bias, state_indices)]
    A, D, dt_bias, state_indices = contiguous
    return ssd_step_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices)


@ssd_step_triton.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices):
    batch, heads, head_dim = x.shape
    return torch.empty_like(x), x.new_empty((batch, heads, head_dim, B.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("ssm_hub::ssd_chunked_scan_fwd", mutates_args=())
def ssd_chunked_scan_fwd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.ssd_chunked_scan import ssd_chunked_scan_fwd

    A, D, dt_bias = [t.contiguous() if t is not None else None for t in (A, D, dt_bias)]
    return ssd_chunked_scan_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                                initial_states)


@ssd_chunked_scan_fwd_triton.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states):
    batch, _, heads, head_dim = x.shape
    return torch.empty_like(x), x.new_empty((batch, heads, head_dim, B.shape[-1]), dtype=torch.float32)
