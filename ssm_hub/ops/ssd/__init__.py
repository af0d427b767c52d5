"""SSD chunked scan (Mamba-2): the public ops and their one dispatch point. The math is in ``reference.py``."""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.ssd.triton_ops import ssd_chunked_scan_fwd_triton, ssd_step_triton  # noqa: F401  (registers the ops)
from ssm_hub.ops.ssd.reference import (
    check_scan_inputs,
    check_step_inputs,
    ssd_chunked_scan_ref,
    ssd_naive_ref,
    ssd_step_ref,
)

__all__ = ["ssd_chunked_scan", "ssd_step", "ssd_chunked_scan_ref", "ssd_naive_ref", "ssd_step_ref"]


def ssd_chunked_scan(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    return_final_states=False,
    backend="auto",
):
    """SSD scan over a sequence: x [B, T, H, P], dt [B, T, H], A [H], B/C [B, T, G, N] -> y [B, T, H, P].

    Arguments and returns as :func:`ssm_hub.ops.ssd.reference.ssd_chunked_scan_ref`; ``backend`` is "auto",
    "triton" or "torch" (see ``ssm_hub.backend``). The Triton kernel is forward-only and takes no ``seq_idx`` /
    ``cu_seqlens``; it runs only when asked for (``backend="triton"`` or ``SSM_HUB_BACKEND=triton``), since it
    is not validated on a GPU yet.
    """
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    # The kernel is not validated on a GPU yet: "auto" keeps the reference.
    if resolve_backend("ssd_chunked_scan", backend, *tensors, in_auto=False) == "triton":
        missing = None
        if seq_idx is not None or cu_seqlens is not None:
            missing = "the SSD Triton kernel does not take seq_idx / cu_seqlens (varlen) yet"
        elif torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            missing = "the SSD Triton kernel has no backward yet (an input requires grad)"
        if missing is not None:
            raise NotImplementedError(
                f"backend='triton' was requested for ssd_chunked_scan, but {missing}. "
                "Use backend='torch' or 'auto', or unset SSM_HUB_BACKEND."
            )
        check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        low, high = dt_limit
        y, final_states = torch.ops.ssm_hub.ssd_chunked_scan_fwd(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, float(low), float(high), initial_states
        )
        return (y, final_states) if return_final_states else y
    args = (x, dt, A, B, C, chunk_size)
    kwargs = dict(
        D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=return_final_states,
    )
    return call_recomputing_in_backward(ssd_chunked_scan_ref, args, kwargs)


def ssd_step(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    state_indices=None,
    backend="auto",
):
    """One decoding step: state [B, H, P, N], x [B, H, P], dt [B, H], B/C [B, G, N] -> (y [B, H, P], new_state).

    ``state_indices`` [B] (integer), for continuous batching: ``state`` is then a pool of slots and row b reads
    slot ``state_indices[b]``; ``new_state`` is always [B, H, P, N], one per row. Arguments and returns otherwise
    as :func:`ssm_hub.ops.ssd.reference.ssd_step_ref`; ``state`` is not modified.
    """
    if resolve_backend("ssd_step", backend, state, x, dt, A, B, C) == "triton":
        check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, state_indices)
        low, high = dt_limit
        return torch.ops.ssm_hub.ssd_step(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, float(low), float(high), state_indices
        )
    return ssd_step_ref(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_indices=state_indices,
    )
