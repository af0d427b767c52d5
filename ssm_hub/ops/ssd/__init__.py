"""SSD chunked scan (Mamba-2): the public ops and their one dispatch point. The math is in ``reference.py``."""

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.ssd.reference import ssd_chunked_scan_ref, ssd_naive_ref, ssd_step_ref

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
    "triton" or "torch" (see ``ssm_hub.backend``).
    """
    resolve_backend("ssd_chunked_scan", backend, has_triton_kernel=False)
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
    backend="auto",
):
    """One decoding step: state [B, H, P, N], x [B, H, P], dt [B, H], B/C [B, G, N] -> (y [B, H, P], new_state).

    Arguments and returns as :func:`ssm_hub.ops.ssd.reference.ssd_step_ref`; ``state`` is not modified.
    """
    resolve_backend("ssd_step", backend, has_triton_kernel=False)
    return ssd_step_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
