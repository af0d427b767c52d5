"""Pure-torch selective scan (Mamba-1): the specification that every ``selective_scan`` backend must match.

Notation: B batch, T tokens, D channels, N state size. Each channel d has its own state [N] and decay rates
A[d] [N] < 0; B_t and C_t [N] depend on the input and are shared by all channels:

    dt_t = softplus(delta_t + delta_bias)                  (bias and softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t      state [D, N]
    y_t  = h_t . C_t + D * u_t                             [D]
    y_t  = y_t * silu(z_t)                                 (optional gate)

``selective_scan_naive_ref`` runs this one token at a time. ``selective_scan_ref`` computes the same states with
a two-level scan of the linear recurrence ``h_t = decay_t * h_{t-1} + input_t``:

1. Cut T into chunks of L tokens and scan inside every chunk from a zero state, all chunks at once (L steps).
2. Pass the state entering each chunk from chunk to chunk (T / L steps): the state entering chunk c + 1 is the one
   entering chunk c times the chunk's total decay, plus the state chunk c reached on its own.
3. Every state is then its chunk's own state plus the entering state times the decay from the chunk's start.

That is L + T / L sequential steps instead of T, about 2 sqrt(T) with the default L = ceil(sqrt(T)). Decays are
multiplied as they come (all in [0, 1]), and the decay from a chunk's start is the exp of a cumulative sum of
non-positive log decays, so nothing can overflow whatever dt is.

Why not the [L, L] "attention" form of the SSD scan: here the decay exp(dt_t * A[d, n]) differs for every channel
and state entry, so the pairwise decays inside a chunk would be [B, L, L, D, N], L times the size of all the
states [B, T, D, N]; the two-level scan only ever holds a few tensors of the states' size.

Documents: at the first token of a document (``seq_idx`` change, ``cu_seqlens`` bound) the log decay is -inf, so
the state restarts from zero there. An initial state enters as an extra input exp(dt_s * A) * h0 at the first
token s of its document (the row start; each document with ``cu_seqlens``), which is exactly h_s = exp(dt_s A) h0 +
dt_s B_s u_s. Final states are the states at the last token of each row or document.
"""

import math

import torch
import torch.nn.functional as F

from ssm_hub.ops.varlen import (
    check_states,
    check_tensor,
    check_varlen,
    compute_dtype,
    document_starts,
    sequence_ends,
)


def _check_params(A, D, delta_bias, dim: int) -> int:
    """Check the per-channel parameters; return the state size N."""
    check_tensor("A", A, "[D, N]")
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape [D, N] with D = {dim}, got {tuple(A.shape)}")
    if D is not None:
        check_tensor("D", D, "[D]", (dim,))
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, "[D]", (dim,))
    return A.shape[1]


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens):
    """Check the inputs of the full-sequence scans; return the document bounds from ``cu_seqlens`` (or None)."""
    check_tensor("u", u, "[B, T, D]")
    batch, seqlen, dim = u.shape
    if seqlen < 1:
        raise ValueError(f"u must hold at least one token, got shape {tuple(u.shape)}")
    check_tensor("delta", delta, "[B, T, D]", u.shape)
    state_size = _check_params(A, D, delta_bias, dim)
    check_tensor("B", B, "[B, T, N]", (batch, seqlen, state_size))
    check_tensor("C", C, "[B, T, N]", (batch, seqlen, state_size))
    if z is not None:
        check_tensor("z", z, "[B, T, D]", u.shape)
    bounds = check_varlen(seq_idx, cu_seqlens, batch, seqlen)
    check_states("initial_state", initial_state, batch, bounds, "D, N", (dim, state_size))
    return bounds


def _discretize_delta(delta, delta_bias, delta_softplus: bool, dtype) -> torch.Tensor:
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    return F.softplus(dt) if delta_softplus else dt


def _skip_and_gate(y, u, D, z) -> torch.Tensor:
    """y + D * u, then * silu(z); all [..., D]."""
    if D is not None:
        y = y + D.to(y.dtype) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan_linear_recurrence(log_decay, inputs, chunk_size: int | None) -> torch.Tensor:
    """All states of h_t = exp(log_decay_t) * h_{t-1} + inputs_t from h_{-1} = 0, by the two-level scan.

    log_decay, inputs: [B, T, D, N] (log_decay <= 0, -inf where the state restarts). Returns [B, T, D, N].
    """
    batch, seqlen, dim, state_size = inputs.shape
    chunk = chunk_size or math.isqrt(seqlen - 1) + 1  # ceil(sqrt(T)) minimises L + T / L
    chunks = math.ceil(seqlen / chunk)
    # Steps appended after the last token (no decay, no input) make T a multiple of L and change nothing.
    pad = (0, 0, 0, 0, 0, chunks * chunk - seqlen)
    log_decay = F.pad(log_decay, pad).reshape(batch, chunks, chunk, dim, state_size)
    inputs = F.pad(inputs, pad).reshape(batch, chunks, chunk, dim, state_size)
    decay = log_decay.exp()

    # 1. Inside every chunk from a zero state, all chunks at once. The loops take their steps from unbind()
    #    rather than indexing: the backward of one index into a big tensor writes a zero tensor of its full size.
    state = torch.zeros_like(inputs[:, :, 0])
    own = []
    for decay_i, input_i in zip(decay.unbind(dim=2), inputs.unbind(dim=2)):
        state = decay_i * state + input_i
        own.append(state)
    own = torch.stack(own, dim=2)  # [B, chunks, L, D, N]

    # 2. The state entering each chunk.
    from_start = log_decay.cumsum(dim=2).exp()  # decay from the chunk's start through token i
    entering = [torch.zeros_like(own[:, 0, 0])]
    for chunk_decay, chunk_end in zip(from_start[:, :-1, -1].unbind(dim=1), own[:, :-1, -1].unbind(dim=1)):
        entering.append(chunk_decay * entering[-1] + chunk_end)
    entering = torch.stack(entering, dim=1)  # [B, chunks, D, N]

    # 3. Every state.
    states = own + from_start * entering[:, :, None]
    return states.reshape(batch, chunks * chunk, dim, state_size)[:, :seqlen]


def selective_scan_ref(
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
    chunk_size=None,
):
    """Selective scan by the two-level algorithm of the module docstring.

    Args:
        u: [B, T, D] inputs. delta: [B, T, D] time steps (before ``delta_bias`` / softplus).
        A: [D, N] decay rates, negative. B, C: [B, T, N] input and output projections, shared by all channels.
        D: [D] skip connection. z: [B, T, D] gate, y * silu(z). delta_bias: [D], added before softplus.
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: [B, D, N], the state before each row's first token; [S, D, N] with ``cu_seqlens``.
        seq_idx: [B, T] document id per token, or cu_seqlens: [S + 1] (batch 1); see ``ssm_hub.ops.varlen``.
        return_final_state: also return the final states.
        chunk_size: L of the two-level scan (default ceil(sqrt(T))); the result does not depend on it beyond
            rounding.

    Returns:
        y [B, T, D] in u's dtype, or (y, final_state) with final_state [B, D, N] ([S, D, N] with ``cu_seqlens``)
        in float32 (float64 for float64 inputs).

    Memory: a few tensors of the size of all states, [B, T, D, N] in float32.
    """
    bounds = _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    batch, seqlen, dim = u.shape
    dtype = compute_dtype(u, delta, A, B, C, initial_state)

    # 1. Discretise: per-token log decays dt * A and inputs dt * B * u, [B, T, D, N].
    dt = _discretize_delta(delta, delta_bias, delta_softplus, dtype)
    log_decay = dt[..., None] * A.to(dtype)
    inputs = (dt * u.to(dtype))[..., None] * B.to(dtype)[:, :, None, :]

    # 2. Initial states enter at the first token of their document as an extra input exp(dt A) h0.
    if initial_state is not None:
        if bounds is None:
            rows, firsts = torch.arange(batch, device=u.device), torch.zeros(batch, dtype=torch.long, device=u.device)
        else:
            firsts = torch.tensor(bounds[:-1], device=u.device)
            rows = torch.zeros_like(firsts)
        entry = log_decay[rows, firsts].exp() * initial_state.to(dtype)
        inputs = inputs.index_put((rows, firsts), inputs[rows, firsts] + entry)

    # 3. Documents restart from zero: a decay of exp(-inf) = 0 at their first token.
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, cu_seqlens=bounds, device=u.device)
    log_decay = log_decay.masked_fill(starts[:, :, None, None], float("-inf"))

    # 4. All states, 5. read out.
    states = _scan_linear_recurrence(log_decay, inputs, chunk_size)
    y = torch.einsum("btdn,btn->btd", states, C.to(dtype))
    y = _skip_and_gate(y, u, D, z).to(u.dtype)
    if return_final_state:
        return y, states[sequence_ends(batch, seqlen, bounds, device=u.device)]
    return y


def selective_scan_naive_ref(
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
):
    """The selective-scan recurrence one token at a time: the textbook definition, the ground truth of the tests.

    Same arguments and returns as :func:`selective_scan_ref` (without ``chunk_size``). Slow; for tests only.
    """
    bounds = _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, cu_seqlens)
    if bounds is not None:
        # Every document on its own, from its own initial state.
        outputs, finals = [], []
        for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            y_d, final_d = selective_scan_naive_ref(
                u[:, start:end], delta[:, start:end], A, B[:, start:end], C[:, start:end], D=D,
                z=None if z is None else z[:, start:end], delta_bias=delta_bias, delta_softplus=delta_softplus,
                initial_state=None if initial_state is None else initial_state[d : d + 1], return_final_state=True,
            )
            outputs.append(y_d)
            finals.append(final_d)
        y, final_state = torch.cat(outputs, dim=1), torch.cat(finals, dim=0)
        return (y, final_state) if return_final_state else y

    batch, seqlen, dim = u.shape
    dtype = compute_dtype(u, delta, A, B, C, initial_state)
    dt = _discretize_delta(delta, delta_bias, delta_softplus, dtype)
    u_f, A_f, B_f, C_f = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, device=u.device)

    state = u_f.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(seqlen):
        if t > 0:
            state = torch.where(starts[:, t, None, None], torch.zeros_like(state), state)
        state = torch.exp(dt[:, t, :, None] * A_f) * state + (dt[:, t] * u_f[:, t])[:, :, None] * B_f[:, t, None, :]
        outputs.append((state * C_f[:, t, None, :]).sum(dim=-1))
    y = _skip_and_gate(torch.stack(outputs, dim=1), u, D, z).to(u.dtype)
    return (y, state) if return_final_state else y


def check_step_inputs(state, u, delta, A, B, C, D, z, delta_bias, state_indices) -> None:
    """Shapes of one selective-scan decoding step; ValueError naming the argument."""
    check_tensor("u", u, "[B, D]")
    batch, dim = u.shape
    check_tensor("delta", delta, "[B, D]", u.shape)
    state_size = _check_params(A, D, delta_bias, dim)
    check_tensor("B", B, "[B, N]", (batch, state_size))
    check_tensor("C", C, "[B, N]", (batch, state_size))
    if state_indices is None:
        check_tensor("state", state, "[B, D, N]", (batch, dim, state_size))
    else:
        check_tensor("state_indices", state_indices, "[B]", (batch,), integer=True)
        check_tensor("state", state, "[slots, D, N]")  # any number of slots
        check_tensor("state", state, "[slots, D, N]", (state.shape[0], dim, state_size))
    if z is not None:
        check_tensor("z", z, "[B, D]", u.shape)


def selective_scan_step_ref(
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
):
    """One token of the selective scan (decoding). Pure: ``state`` is not modified.

    Args:
        state: [B, D, N] the state before this token.
        u, delta: [B, D]; A: [D, N]; B, C: [B, N]; D: [D]; z: [B, D]; delta_bias: [D]; delta_softplus: as in
        :func:`selective_scan_ref`.
        state_indices: [B] integer, optional: ``state`` is then a pool [slots, D, N] and row b starts from
            ``state[state_indices[b]]`` (continuous batching).
        A_is_log: ``A`` is Mamba's ``A_log`` = log(-A); the step uses -exp(A_log) computed in float32.

    Returns:
        (y [B, D] in u's dtype, new_state [B, D, N] in float32, or float64 for float64 inputs).
    """
    check_step_inputs(state, u, delta, A, B, C, D, z, delta_bias, state_indices)
    if state_indices is not None:
        state = state[state_indices]
    dtype = compute_dtype(state, u, delta, A, B, C)

    # 1. Discretise, 2. decay the state and add this token's input, 3. read out.
    dt = _discretize_delta(delta, delta_bias, delta_softplus, dtype)
    A = (-torch.exp(A.float()) if A_is_log else A).to(dtype)  # float32, as the mixers' own A
    decay = torch.exp(dt[..., None] * A)
    new_state = decay * state.to(dtype) + (dt * u.to(dtype))[..., None] * B.to(dtype)[:, None, :]
    y = torch.einsum("bdn,bn->bd", new_state, C.to(dtype))
    return _skip_and_gate(y, u, D, z).to(u.dtype), new_state
