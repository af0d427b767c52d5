"""Pure-torch causal depthwise conv1d: the specification that every ``causal_conv1d`` backend must match.

Notation: B batch, T tokens, C channels, K kernel width (K >= 2). Each channel has its own kernel weight[c] [K]:

    y_t = act(bias + sum_{k < K} weight[:, k] * x_{t - (K - 1) + k})        act: identity or silu

The window of token t holds the K - 1 inputs before it and itself, oldest first. Where it reaches before the
start of the token's document it reads that document's initial state (the K - 1 inputs that came before it,
oldest first) if it has one, else zeros. Without varlen the row is the document and ``initial_state`` [B, C, K - 1]
belongs to it; with ``seq_idx`` only each row's first document has one (later documents start from zeros); with
``cu_seqlens`` each document has its own [S, C, K - 1].

The reference gathers: every tap of every window reads one row of a table made of the input tokens, the slots of
the initial states and one row of zeros. The final state of a row or document is the window of its last token
minus its oldest entry, i.e. the last K - 1 inputs, reaching into the initial state or zeros when the document is
shorter than K - 1.
"""

import torch
import torch.nn.functional as F

from ssm_hub.ops.varlen import (
    check_states,
    check_tensor,
    check_varlen,
    compute_dtype,
    document_ids,
    document_starts,
    sequence_ends,
)

ACTIVATIONS = (None, "silu")


def _check_params(weight, bias, activation, channels: int) -> int:
    """Check the kernel, bias and activation; return the kernel width K."""
    check_tensor("weight", weight, "[C, K]")
    if weight.shape[0] != channels or weight.shape[1] < 2:
        raise ValueError(f"weight must have shape [C, K] with C = {channels} and K >= 2, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, "[C]", (channels,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return weight.shape[1]


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


def _window_rows(batch, seqlen, width, starts, state_of_token, num_states) -> torch.Tensor:
    """[B, T, K] row of the table that each tap of each window reads.

    Table rows: the B * T input tokens (row-major), then K - 1 slots for each of the ``num_states`` initial states
    (oldest first), then one row of zeros. ``starts`` [B, T] marks document starts and ``state_of_token`` [B, T]
    names the initial state of each token's document (-1: none, read zeros).
    """
    device = starts.device
    positions = torch.arange(seqlen, device=device)
    doc_start = torch.where(starts, positions, 0).cummax(dim=1).values  # [B, T] first token of each document
    tap_position = positions[:, None] - (width - 1) + torch.arange(width, device=device)  # [T, K]
    from_start = tap_position[None] - doc_start[..., None]  # [B, T, K]: < 0 before the document starts
    token_row = torch.arange(batch, device=device)[:, None, None] * seqlen + tap_position[None]
    state_row = batch * seqlen + (state_of_token[..., None] + 1) * (width - 1) + from_start
    zero_row = batch * seqlen + num_states * (width - 1)
    return torch.where(
        from_start >= 0, token_row, torch.where(state_of_token[..., None] >= 0, state_row, zero_row)
    )


def check_inputs(x, weight, bias, activation, initial_state, seq_idx, cu_seqlens):
    """Shapes of a full-sequence conv (ValueError naming the argument); returns (K, cu_seqlens as a list or None)."""
    check_tensor("x", x, "[B, T, C]")
    batch, seqlen, channels = x.shape
    if seqlen < 1:
        raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
    width = _check_params(weight, bias, activation, channels)
    bounds = check_varlen(seq_idx, cu_seqlens, batch, seqlen)
    check_states("initial_state", initial_state, batch, bounds, "C, K - 1", (channels, width - 1))
    return width, bounds


def causal_conv1d_ref(
    x,
    weight,
    bias=None,
    activation=None,
    initial_state=None,
    seq_idx=None,
    cu_seqlens=None,
    return_final_state=False,
):
    """Causal depthwise conv1d over time, channels last.

    Args:
        x: [B, T, C] inputs. weight: [C, K] (K >= 2). bias: [C]. activation: None or "silu".
        initial_state: [B, C, K - 1], the K - 1 inputs before each row, oldest first; [S, C, K - 1] with
            ``cu_seqlens``. None means zeros.
        seq_idx: [B, T] document id per token, or cu_seqlens: [S + 1] (batch 1); see ``ssm_hub.ops.varlen``.
        return_final_state: also return the final states.

    Returns:
        y [B, T, C] in x's dtype, or (y, final_state) with final_state [B, C, K - 1] ([S, C, K - 1] with
        ``cu_seqlens``) in x's dtype: the last K - 1 inputs of each row (of its last document) or of each document.
    """
    width, bounds = check_inputs(x, weight, bias, activation, initial_state, seq_idx, cu_seqlens)
    batch, seqlen, channels = x.shape
    dtype = compute_dtype(x, weight, bias, initial_state)

    # 1. Documents, and the initial state each token's document starts from: with cu_seqlens every document has
    #    its own; otherwise only the document that starts the row does.
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, cu_seqlens=bounds, device=x.device)
    docs = document_ids(starts)
    if initial_state is None:
        state_of_token = torch.full_like(docs, -1)
    elif bounds is None:
        state_of_token = torch.where(docs == 0, torch.arange(batch, device=x.device)[:, None], -1)
    else:
        state_of_token = docs

    # 2. The table: tokens, initial-state slots, zeros.
    parts = [x.to(dtype).reshape(batch * seqlen, channels)]
    if initial_state is not None:
        parts.append(initial_state.to(dtype).transpose(1, 2).reshape(-1, channels))
    parts.append(x.new_zeros(1, channels, dtype=dtype))
    table = torch.cat(parts)

    # 3. Every tap of every window reads one row; weight and sum the taps.
    num_states = 0 if initial_state is None else initial_state.shape[0]
    rows = _window_rows(batch, seqlen, width, starts, state_of_token, num_states)
    w = weight.to(dtype)
    y = sum(table[rows[..., k]] * w[:, k] for k in range(width))
    if bias is not None:
        y = y + bias.to(dtype)
    y = _activate(y, activation).to(x.dtype)
    if not return_final_state:
        return y

    # 4. Final states: the window of each last token without its oldest entry, as [.., C, K - 1].
    last_rows = rows[sequence_ends(batch, seqlen, bounds, device=x.device)][:, 1:]  # [B or S, K - 1]
    return y, table[last_rows].transpose(1, 2).to(x.dtype)


def check_step_inputs(x, conv_state, weight, bias, activation, state_indices) -> None:
    """Shapes of one causal conv1d decoding step; ValueError naming the argument."""
    check_tensor("x", x, "[B, C]")
    batch, channels = x.shape
    width = _check_params(weight, bias, activation, channels)
    if state_indices is None:
        check_tensor("conv_state", conv_state, "[B, C, K - 1]", (batch, channels, width - 1))
    else:
        check_tensor("state_indices", state_indices, "[B]", (batch,), integer=True)
        check_tensor("conv_state", conv_state, "[slots, C, K - 1]")  # any number of slots
        check_tensor("conv_state", conv_state, "[slots, C, K - 1]", (conv_state.shape[0], channels, width - 1))


def causal_conv1d_step_ref(x, conv_state, weight, bias=None, activation=None, state_indices=None):
    """One token of the causal conv1d (decoding). Pure: ``conv_state`` is not modified.

    Args:
        x: [B, C] this token's input. conv_state: [B, C, K - 1] the K - 1 inputs before it, oldest first.
        weight: [C, K]; bias: [C]; activation: None or "silu".
        state_indices: [B] integer, optional: ``conv_state`` is then a pool [slots, C, K - 1] and row b reads
            ``conv_state[state_indices[b]]`` (continuous batching).

    Returns:
        (y [B, C] in x's dtype, new_conv_state [B, C, K - 1] = the window shifted by this token, in conv_state's
        dtype; one per row, also with ``state_indices``).
    """
    check_step_inputs(x, conv_state, weight, bias, activation, state_indices)
    if state_indices is not None:
        conv_state = conv_state[state_indices]
    dtype = compute_dtype(x, conv_state, weight, bias)

    window = torch.cat([conv_state.to(dtype), x.to(dtype)[..., None]], dim=-1)  # [B, C, K], oldest first
    y = (window * weight.to(dtype)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(dtype)
    return _activate(y, activation).to(x.dtype), window[..., 1:].to(conv_state.dtype)
