"""The selective-scan kernels registered as torch custom ops (``torch.ops.ssm_hub.*``), with fake implementations so
that ``torch.compile`` traces through them without graph breaks. Registering needs no triton; the kernels are
imported when an op first runs."""

import torch


@torch.library.custom_op("ssm_hub::selective_scan_step", mutates_args=())
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
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.selective_scan_step import selective_scan_step_fwd

    contiguous = [t.contiguous() if t is not None else None for t in (A, D, delta_bias, state_indices)]
    A, D, delta_bias, state_indices = contiguous
    return selective_scan_step_fwd(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices)


@selective_scan_step_triton.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices):
    batch, dim = u.shape
    return torch.empty_like(u), u.new_empty((batch, dim, A.shape[1]), dtype=torch.float32)
