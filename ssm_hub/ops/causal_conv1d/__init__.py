"""Causal depthwise conv1d: the public ops and their one dispatch point. The math is in ``reference.py``."""

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.decode_state import write_new_state
from ssm_hub.ops.recompute import call_recomputing_in_backward
from ssm_hub.ops.causal_conv1d.reference import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    check_inputs,
    check_step_inputs,
)
from ssm_hub.ops.causal_conv1d.custom_ops import (
    causal_conv1d_fwd_triton,
    causal_conv1d_step_in_place_triton,
    causal_conv1d_step_triton,
)

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
    if resolve_backend("causal_conv1d", backend, x, weight, bias, initial_state, seq_idx, cu_seqlens) == "triton":
        check_inputs(x, weight, bias, activation, initial_state, seq_idx, cu_seqlens)
        y, final_state = causal_conv1d_fwd_triton(
            x, weight, bias, initial_state, seq_idx, cu_seqlens, activation == "silu"
        )
        return (y, final_state) if return_final_state else y
    kwargs = dict(
        bias=bias, activation=activation, initial_state=initial_state, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        return_final_state=return_final_state,
    )
    return call_recomputing_in_backward(causal_conv1d_ref, (x, weight), kwargs)


def causal_conv1d_step(
    x, conv_state, weight, bias=None, activation=None, state_indices=None, in_place=False, backend="auto"
):
    """One decoding step: x [B, C], conv_state [B, C, K - 1] -> (y [B, C], new_conv_state [B, C, K - 1]).

    ``state_indices`` [B] (integer), for continuous batching: ``conv_state`` is then a pool of slots and row b
    reads slot ``state_indices[b]``; ``new_conv_state`` is then [B, C, K - 1], one per row. ``in_place``: write
    each row's new window over the slot it read and return ``conv_state`` itself, so a cache needs no copy (see
    :mod:`ssm_hub.ops.decode_state`); otherwise ``conv_state`` is not modified. Arguments and returns otherwise
    as :func:`ssm_hub.ops.causal_conv1d.reference.causal_conv1d_step_ref`.
    """
    if resolve_backend("causal_conv1d_step", backend, x, conv_state, weight, bias) == "triton":
        check_step_inputs(x, conv_state, weight, bias, activation, state_indices)
        args = (x, conv_state, weight, bias, activation, state_indices)
        if in_place:
            return causal_conv1d_step_in_place_triton(*args), conv_state
        return causal_conv1d_step_triton(*args)
    y, new_state = causal_conv1d_step_ref(
        x, conv_state, weight, bias=bias, activation=activation, state_indices=state_indices
    )
    return (y, write_new_state(conv_state, new_state, state_indices)) if in_place else (y, new_state)
