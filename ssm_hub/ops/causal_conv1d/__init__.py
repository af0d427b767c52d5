"""Causal depthwise conv1d: the public ops and their one dispatch point. The math is in ``reference.py``."""

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.causal_conv1d.reference import causal_conv1d_ref, causal_conv1d_step_ref

__all__ = ["causal_conv1d", "causal_conv1d_step", "causal_conv1d_ref", "causal_conv1d_step_ref"]


def causal_conv1d(
    x,
    weight,
    bias=None,
    activation=None,
    initial_state=None,
    seq_idx=None,
    cu_seqlens=None,
    return_final_state=False,
    backend="auto",
):
    """Causal depthwise conv1d: x [B, T, C], weight [C, K] -> y [B, T, C].

    Arguments and returns as :func:`ssm_hub.ops.causal_conv1d.reference.causal_conv1d_ref`; ``backend`` is
    "auto", "triton" or "torch" (see ``ssm_hub.backend``).
    """
    resolve_backend("causal_conv1d", backend, has_triton_kernel=False)
    kwargs = dict(
        bias=bias, activation=activation, initial_state=initial_state, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        return_final_state=return_final_state,
    )
    return call_recomputing_in_backward(causal_conv1d_ref, (x, weight), kwargs)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation=None, backend="auto"):
    """One decoding step: x [B, C], conv_state [B, C, K - 1] -> (y [B, C], new_conv_state [B, C, K - 1]).

    Arguments and returns as :func:`ssm_hub.ops.causal_conv1d.reference.causal_conv1d_step_ref`; ``conv_state``
    is not modified.
    """
    resolve_backend("causal_conv1d_step", backend, has_triton_kernel=False)
    return causal_conv1d_step_ref(x, conv_state, weight, bias=bias, activation=activation)
