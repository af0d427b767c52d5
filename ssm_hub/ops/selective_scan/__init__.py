"""Selective scan (Mamba-1): the public ops and their one dispatch point. The math is in ``reference.py``."""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.decode_state import write_new_state
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.selective_scan.reference import (
    _check_scan_inputs,
    check_step_inputs,
    selective_scan_naive_ref,
    selective_scan_ref,
    selective_scan_step_ref,
)
from ssm_hub.ops.selective_scan.custom_ops import (
    selective_scan_fwd_triton,
    selective_scan_step_in_place_triton,
    selective_scan_step_triton,
)

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
    "auto", "triton" or "torch" (see ``ssm_hub.backend``). The Triton kernel computes in float32 whatever the inputs (the final state is float32 even for float64 inputs) and keeps
    float32 states every few tokens for its backward (4 bytes per 16 elements of [B, T, D, N] on a GPU); the
    reference keeps only its inputs and recomputes everything in the backward.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if resolve_backend("selective_scan", backend, *tensors) == "triton":
        _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        y, final_state, _ = selective_scan_fwd_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, cu_seqlens, needs_grad
        )
        return (y, final_state) if return_final_state else y
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
    A_is_log=False,
    in_place=False,
    backend="auto",
):
    """One decoding step: state [B, D, N], u/delta [B, D], B/C [B, N] -> (y [B, D], new_state [B, D, N]).

    ``state_indices`` [B] (integer), for continuous batching: ``state`` is then a pool of slots and row b reads
    slot ``state_indices[b]``; ``new_state`` is then [B, D, N], one per row. ``in_place``: write each row's new
    state over the slot it read (in ``state``'s dtype) and return ``state`` itself, so a cache needs no copy (see
    :mod:`ssm_hub.ops.decode_state`); otherwise ``state`` is not modified. ``A_is_log``: ``A`` is Mamba's
    ``A_log`` parameter, log(-A), and the step computes A = -exp(A_log) in float32 itself (as the mixer does for a
    sequence), so that a decoding model spends no launches on it. Arguments and returns otherwise as
    :func:`ssm_hub.ops.selective_scan.reference.selective_scan_step_ref`.
    """
    if resolve_backend("selective_scan_step", backend, state, u, delta, A, B, C) == "triton":
        check_step_inputs(state, u, delta, A, B, C, D, z, delta_bias, state_indices)
        args = (state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_indices, bool(A_is_log))
        if in_place:
            return selective_scan_step_in_place_triton(*args), state
        return selective_scan_step_triton(*args)
    y, new_state = selective_scan_step_ref(
        state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        state_indices=state_indices, A_is_log=A_is_log,
    )
    return (y, write_new_state(state, new_state, state_indices)) if in_place else (y, new_state)
