"""Selective scan (Mamba-1): the public ops and their one dispatch point. The math is in ``reference.py``."""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.selective_scan.reference import (
    check_step_inputs,
    selective_scan_naive_ref,
    selective_scan_ref,
    selective_scan_step_ref,
)
from ssm_hub.ops.selective_scan.triton_ops import selective_scan_step_triton  # noqa: F401  (registers the op)

__all__ = [
    "selective_scan",
    "selective_scan_step",
    "selective_scan_ref",
    "selective_scan_naive_ref",
    "selective_scan_step_ref",
]


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    seq_idx=None,
    cu_seqlens=None,
    return_final_state=False,
    backend="auto",
):
    """Selective scan over a sequence: u, delta [B, T, D], A [D, N], B/C [B, T, N] -> y [B, T, D].

    Arguments and returns as :func:`ssm_hub.ops.selective_scan.reference.selective_scan_ref`; ``backend`` is
    "auto", "triton" or "torch" (see ``ssm_hub.backend``).
    """
    resolve_backend("selective_scan", backend, has_triton_kernel=False)
    args = (u, delta, A, B, C)
    kwargs = dict(
        D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_state=return_final_state,
    )
    return call_recomputing_in_backward(selective_scan_ref, args, kwargs)


def selective_scan_step(
    state,
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    state_indices=None,
    backend="auto",
):
    """One decoding step: state [B, D, N], u/delta [B, D], B/C [B, N] -> (y [B, D], new_state [B, D, N]).

    ``state_indices`` [B] (integer), for continuous batching: ``state`` is then a pool of slots and row b reads
    slot ``state_indices[b]``; ``new_state`` is always [B, D, N], one per row. Arguments and returns otherwise as
    :func:`ssm_hub.ops.selective_scan.reference.selective_scan_step_ref`; ``state`` is not modified.
    """
    if resolve_backend("selective_scan_step", backend, state, u, delta, A, B, C) == "triton":
        check_step_inputs(state, u, delta, A, B, C, D, z, delta_bias, state_indices)
        return torch.ops.ssm_hub.selective_scan_step(
            state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices
        )
    return selective_scan_step_ref(
        state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        state_indices=state_indices,
    )
