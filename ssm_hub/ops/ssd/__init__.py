"""SSD chunked scan (Mamba-2): the public ops and their one dispatch point. The math is in ``reference.py``."""

import torch

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.decode_state import write_new_state
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.varlen import cu_seqlens_to_seq_idx, document_ids, document_starts
from ssm_hub.ops.ssd.custom_ops import ssd_chunked_scan_fwd_triton, ssd_step_in_place_triton, ssd_step_triton
from ssm_hub.ops.ssd.reference import (
    check_scan_inputs,
    check_step_inputs,
    document_chunk_layout,
    ssd_chunked_scan_ref,
    ssd_mixing_matrix,
    ssd_naive_ref,
    ssd_step_ref,
)

__all__ = ["ssd_chunked_scan", "ssd_step", "scan_documents", "ssd_chunked_scan_ref", "ssd_mixing_matrix",
           "ssd_naive_ref", "ssd_step_ref"]


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
    "triton" or "torch" (see ``ssm_hub.backend``). Both backends take gradients for every input, through the
    final states too.
    """
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    if resolve_backend("ssd_chunked_scan", backend, *tensors) == "triton":
        y, final_states = _ssd_chunked_scan_triton(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, cu_seqlens,
            return_final_states,
        )
        return (y, final_states) if return_final_states else y
    args = (x, dt, A, B, C, chunk_size)
    kwargs = dict(
        D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
        seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=return_final_states,
    )
    return call_recomputing_in_backward(ssd_chunked_scan_ref, args, kwargs)


def _ssd_chunked_scan_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                             seq_idx, cu_seqlens, return_final_states):
    """The kernels' document layout (see ``ssm_hub.kernels.ssd_chunked_scan``), then the custom op."""
    from ssm_hub.kernels.ssd_chunked_scan import DOC_CHUNKS

    bounds = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    batch, seqlen = x.shape[:2]
    low, high = dt_limit
    scan = ssd_chunked_scan_fwd_triton
    per_document_states = initial_states is not None or return_final_states
    if bounds is not None and per_document_states:
        # Per-document states: every document on whole chunks of its own, then back to the caller's layout.
        positions, _, padded = document_chunk_layout(bounds, chunk_size, x.device)
        length = sum(padded)
        lengths = torch.tensor([end - start for start, end in zip(bounds[:-1], bounds[1:])], device=x.device)
        doc_ids = torch.full((1, length), -1, dtype=torch.int32, device=x.device)
        doc_ids[0, positions] = torch.repeat_interleave(torch.arange(len(padded), device=x.device), lengths).int()

        def place(t):
            return None if t is None else t.new_zeros(1, length, *t.shape[2:]).index_copy(1, positions, t)

        y, final_states, *_ = scan(place(x), place(dt), A, place(B), place(C), chunk_size, D, place(z), dt_bias,
                                   dt_softplus, float(low), float(high), initial_states, doc_ids, DOC_CHUNKS,
                                   len(padded))
        return y[:, positions], final_states
    if bounds is not None:
        seq_idx = cu_seqlens_to_seq_idx(cu_seqlens)
    doc_ids, doc_mode = scan_documents(batch, seqlen, seq_idx, x.device)
    y, final_states, *_ = scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, float(low), float(high),
                               initial_states, doc_ids, doc_mode, batch)
    return y, final_states


def scan_documents(batch: int, seqlen: int, seq_idx, device) -> tuple[torch.Tensor | None, int]:
    """The scan kernels' (doc_ids, doc_mode) for packed documents marked by ``seq_idx`` [B, T] (or none): the
    documents numbered in order along each row, whatever ids seq_idx used, masked inside chunks."""
    from ssm_hub.kernels.ssd_chunked_scan import DOC_MASKS, NO_DOCS

    if seq_idx is None:
        return None, NO_DOCS
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, device=device)
    return document_ids(starts).int(), DOC_MASKS


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
    A_is_log=False,
    in_place=False,
    backend="auto",
):
    """One decoding step: state [B, H, P, N], x [B, H, P], dt [B, H], B/C [B, G, N] -> (y [B, H, P], new_state).

    ``state_indices`` [B] (integer), for continuous batching: ``state`` is then a pool of slots and row b reads
    slot ``state_indices[b]``; ``new_state`` is then [B, H, P, N], one per row. ``in_place``: write each row's new
    state over the slot it read (in ``state``'s dtype) and return ``state`` itself as new_state, so a cache needs
    no copy (see :mod:`ssm_hub.ops.decode_state`); otherwise ``state`` is not modified. ``A_is_log``: ``A`` is
    Mamba-2's ``A_log`` parameter, log(-A), and the step computes A = -exp(A_log) in float32 itself (as the mixer does
    for a sequence), so that a decoding model spends no launches on it. Arguments and returns otherwise as
    :func:`ssm_hub.ops.ssd.reference.ssd_step_ref`.
    """
    if resolve_backend("ssd_step", backend, state, x, dt, A, B, C) == "triton":
        check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, state_indices)
        args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, float(dt_limit[0]), float(dt_limit[1]),
                state_indices, bool(A_is_log))
        if in_place:
            return ssd_step_in_place_triton(*args), state
        return ssd_step_triton(*args)
    y, new_state = ssd_step_ref(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        state_indices=state_indices, A_is_log=A_is_log,
    )
    return (y, write_new_state(state, new_state, state_indices)) if in_place else (y, new_state)
