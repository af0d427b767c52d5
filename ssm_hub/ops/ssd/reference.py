"""Pure-torch SSD scan (Mamba-2's state-space dual): the specification that every ``ssd`` backend must match.

Notation: B batch, T tokens, H heads of P channels, G groups of heads sharing B/C (head h uses group
h // (H / G)), N state size, L chunk length. Per head, with a scalar decay A[h] < 0 and a state [P, N]:

    dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit)     (bias and softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t      state [P, N]
    y_t  = h_t C_t + D * x_t                               [P]
    y_t  = y_t * silu(z_t)                                 (optional gate)

``ssd_naive_ref`` is that recurrence one token at a time. ``ssd_chunked_scan_ref`` computes the same values by
chunks of L tokens (the block decomposition of the Mamba-2 paper). Unrolling the recurrence inside a chunk, with
``h_in`` the state entering the chunk and ``a_t = sum_{u <= t} dt_u A`` counted from the chunk's start:

    h_t = exp(a_t) h_in + sum_{s <= t} exp(a_t - a_s) dt_s x_s ⊗ B_s
    y_t = exp(a_t) h_in C_t + sum_{s <= t} exp(a_t - a_s) (C_t . B_s) dt_s x_s

The second term is a causal [L, L] "attention" inside the chunk, computed for all chunks at once; the first needs
only the state entering each chunk, passed from chunk to chunk in a loop over T / L steps. Memory stays linear in
T: [L, L] per chunk and one state per chunk, never anything [T, T] or [chunks, chunks].

Numerics: ``exp(a_t - a_s)`` is computed as the exp of ``sum_{s < u <= t} dt_u A`` summed from its own terms (no
difference of two large cumulative sums), and entries with s > t (which would be exp of a large positive number)
are set to -inf before the exp. Every exponent is then <= 0: nothing overflows and nothing computes inf * 0.

Documents (``seq_idx``) enter the chunked scan as masks: there is no decay path between tokens of different
documents (the [L, L] entries are -inf before exp), the state entering a chunk reaches only the tokens of its own
document, and a chunk's end state gathers only its last document's tokens. With ``cu_seqlens`` each document is
instead laid out on whole chunks of its own (padded with tokens that change nothing, at most L - 1 a document), so
each document's initial state simply replaces the state entering its first chunk and its final state is the state
after its last chunk.
"""

import math

import torch
import torch.nn.functional as F

from ssm_hub.ops.varlen import (
    check_states,
    check_tensor,
    check_varlen,
    compute_dtype,
    document_ids,
    document_starts,
)


def _check_params(A, D, dt_bias, dt_limit, heads: int, head_dim: int) -> None:
    check_tensor("A", A, "[H]", (heads,))
    if D is not None:
        with_p = isinstance(D, torch.Tensor) and D.dim() == 2
        check_tensor("D", D, "[H, P]" if with_p else "[H]", (heads, head_dim) if with_p else (heads,))
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, "[H]", (heads,))
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must be a pair (low, high) with low <= high, got {dt_limit}")


def _check_groups(heads: int, groups: int) -> None:
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"B and C must have a number of groups G that divides the number of heads H={heads}, "
                         f"got G={groups}")


def check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens):
    """Check the inputs of the full-sequence scans; return the document bounds from ``cu_seqlens`` (or None)."""
    check_tensor("x", x, "[B, T, H, P]")
    batch, seqlen, heads, head_dim = x.shape
    if seqlen < 1:
        raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
    check_tensor("dt", dt, "[B, T, H]", (batch, seqlen, heads))
    check_tensor("B", B, "[B, T, G, N]")
    groups, state_size = B.shape[2], B.shape[3]
    if B.shape[:2] != x.shape[:2]:
        raise ValueError(f"B must have shape [B, T, G, N] with B, T = {(batch, seqlen)}, got {tuple(B.shape)}")
    _check_groups(heads, groups)
    check_tensor("C", C, "[B, T, G, N]", (batch, seqlen, groups, state_size))
    _check_params(A, D, dt_bias, dt_limit, heads, head_dim)
    if z is not None:
        check_tensor("z", z, "[B, T, H, P]", x.shape)
    bounds = check_varlen(seq_idx, cu_seqlens, batch, seqlen)
    check_states("initial_states", initial_states, batch, bounds, "H, P, N", (heads, head_dim, state_size))
    return bounds


def _discretize_dt(dt, dt_bias, dt_softplus: bool, dt_limit, dtype) -> torch.Tensor:
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _skip_and_gate(y, x, D, z) -> torch.Tensor:
    """y + D * x, then * silu(z); y, x, z [..., H, P] in the compute dtype or castable to it."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + (D if D.dim() == 2 else D[:, None]) * x.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _segsum(log_decay: torch.Tensor) -> torch.Tensor:
    """[..., L] log decay of each token -> [..., L, L] whose entry [t, s] is sum_{s < u <= t} log_decay[u] for
    s <= t and -inf for s > t, so that its exp is the decay from token s to token t (1 on the diagonal)."""
    length = log_decay.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=log_decay.device)
    terms = log_decay[..., :, None].expand(*log_decay.shape, length).masked_fill(~ones.tril(-1), 0.0)
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def _ssd_chunks(x, dt, A, B, C, chunk_size: int, doc_ids, restarts: dict, final_chunks: list[int]):
    """The chunked scan on a layout whose length is a multiple of ``chunk_size``, all in the compute dtype.

    x [B, T, H, P], dt [B, T, H] (discretised), A [H], B/C [B, T, G, N], doc_ids [B, T] or None (one document
    per row). ``restarts`` maps a chunk index to the state [B, H, P, N] that enters it in place of the carried one
    (chunk 0 always has one). Returns y [B, T, H, P] (without D and gate) and the states [B, H, P, N] after each
    chunk of ``final_chunks``.
    """
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = B.shape[2:]
    chunks, per_group = seqlen // chunk_size, heads // groups
    # Heads as [G, H/G]: B and C are contracted per group, never copied to every head.
    x = x.reshape(batch, chunks, chunk_size, groups, per_group, head_dim)
    dt = dt.reshape(batch, chunks, chunk_size, groups, per_group).permute(0, 1, 3, 4, 2)  # [B, c, G, H/G, L]
    B = B.reshape(batch, chunks, chunk_size, groups, state_size)
    C = C.reshape(batch, chunks, chunk_size, groups, state_size)

    # 1. Decays inside each chunk, as log decays: from the chunk's start through token t, and from s to t.
    log_decay = dt * A.reshape(groups, per_group)[..., None]  # [B, c, G, H/G, L]
    from_start = log_decay.cumsum(dim=-1)
    pairwise = _segsum(log_decay)  # [B, c, G, H/G, L, L]

    # 2. Documents, masked before exp: no decay path between two documents, and the state entering a chunk
    #    (which belongs to the document of the token before the chunk; for chunk 0 the row's first document)
    #    reaches only the tokens of that document.
    if doc_ids is not None:
        docs = doc_ids.reshape(batch, chunks, chunk_size)
        entering_doc = torch.cat([docs[:, :1, :1], docs[:, :-1, -1:]], dim=1)  # [B, c, 1]
        same_doc = docs[:, :, :, None] == docs[:, :, None, :]
        pairwise = pairwise.masked_fill(~same_doc[:, :, None, None], float("-inf"))
        from_start = from_start.masked_fill(~(docs == entering_doc)[:, :, None, None], float("-inf"))
    decay = pairwise.exp()

    # 3. Inside each chunk: y_t = sum_{s <= t} decay[t, s] (C_t . B_s) dt_s x_s.
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None] * decay * dt[..., None, :]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, x)

    # 4. What each chunk adds to the state after it, starting from zero: the last row of decay goes from each
    #    token to the chunk's end (zero for tokens that are not of the chunk's last document).
    to_end = decay[..., -1, :] * dt  # [B, c, G, H/G, L]
    chunk_states = torch.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", to_end, x, B)

    # 5. Pass states from chunk to chunk: the state entering chunk c + 1 is the one entering chunk c, decayed over
    #    the chunk (zero if the chunk's last token is of another document), plus chunk c's own contribution.
    through = from_start[..., -1].exp()[..., None, None]  # [B, c, G, H/G, 1, 1]
    entering, finals, wanted = [], {}, set(final_chunks)
    state = None
    for chunk, (chunk_decay, chunk_state) in enumerate(zip(through.unbind(dim=1), chunk_states.unbind(dim=1))):
        if chunk in restarts:
            state = restarts[chunk].reshape(batch, groups, per_group, head_dim, state_size)
        entering.append(state)
        state = chunk_decay * state + chunk_state
        if chunk in wanted:
            finals[chunk] = state
    entering = torch.stack(entering, dim=1)  # [B, c, G, H/G, P, N]

    # 6. The entering state's share of each output: exp(a_t) (h_in C_t).
    from_entry = torch.einsum("bclgn,bcgrpn->bclgrp", C, entering)
    y = y + from_entry * from_start.exp().permute(0, 1, 4, 2, 3)[..., None]
    finals = [finals[chunk].reshape(batch, heads, head_dim, state_size) for chunk in final_chunks]
    return y.reshape(batch, seqlen, heads, head_dim), finals


def ssd_mixing_matrix(dt, A, B, C, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")), seq_idx=None):
    """The SSD scan as one [B, H, T, T] matrix M per head, ``y = M x + D x`` from a zero state (the Mamba-2 paper's
    sequence transformation): ``M[t, s] = (C_t . B_s) exp(sum_{s < u <= t} dt_u A) dt_s`` for s <= t in the same
    document (``seq_idx``), else 0. Quadratic in T: for distillation against attention matrices (MOHAWK's
    matrix orientation) and tests, on short sequences."""
    batch, seqlen, groups, _ = B.shape
    heads = dt.shape[-1]
    dtype = compute_dtype(dt, A, B, C)
    dt_f = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)                      # [B, T, H]
    decay = torch.exp(_segsum((dt_f * A.to(dtype)).transpose(1, 2)))                     # [B, H, T, T]
    scores = torch.einsum("btgn,bsgn->bgts", C.to(dtype), B.to(dtype))                     # [B, G, T, T]
    scores = scores.repeat_interleave(heads // groups, dim=1)                              # [B, H, T, T]
    matrix = scores * decay * dt_f.transpose(1, 2)[:, :, None, :]
    if seq_idx is not None:
        same = seq_idx[:, :, None] == seq_idx[:, None, :]
        matrix = matrix * same[:, None].to(dtype)
    return matrix


def document_chunk_layout(bounds: list[int], chunk_size: int, device) -> tuple[torch.Tensor, list[int], list[int]]:
    """Lay the documents of ``cu_seqlens`` (as a list of bounds) on whole chunks of their own, one after another.

    Returns (positions [T] int64: where each token goes, offsets: where each document starts, padded: each
    document's length rounded up to whole chunks). The layout is sum(padded) tokens long.
    """
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    padded = [math.ceil(n / chunk_size) * chunk_size for n in lengths]
    offsets = [sum(padded[:d]) for d in range(len(padded))]
    positions = torch.cat([torch.arange(n, device=device) + off for n, off in zip(lengths, offsets)])
    return positions, offsets, padded


def ssd_chunked_scan_ref(
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
):
    """Chunked SSD scan. See the module docstring for the recurrence and the algorithm.

    Args:
        x: [B, T, H, P] inputs. T need not be a multiple of ``chunk_size``.
        dt: [B, T, H] time steps (before ``dt_bias`` / softplus / ``dt_limit``).
        A: [H] decay rates, negative.
        B, C: [B, T, G, N] input and output projections; H must be a multiple of G.
        chunk_size: L, tokens per chunk (a positive int; the result does not depend on it beyond rounding).
        D: [H] or [H, P] skip connection. z: [B, T, H, P] gate, y * silu(z). dt_bias: [H].
        dt_softplus: apply softplus to dt + dt_bias. dt_limit: (low, high) clamp applied last.
        initial_states: [B, H, P, N], the state before each row's first token; [S, H, P, N] with ``cu_seqlens``.
        seq_idx: [B, T] document id per token, or cu_seqlens: [S + 1] (batch 1); see ``ssm_hub.ops.varlen``.
        return_final_states: also return the final states.

    Returns:
        y [B, T, H, P] in x's dtype, or (y, final_states) with final_states [B, H, P, N] ([S, H, P, N] with
        ``cu_seqlens``) in float32 (float64 for float64 inputs).
    """
    bounds = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    batch, seqlen, heads, head_dim = x.shape
    state_size = B.shape[-1]
    dtype = compute_dtype(x, dt, A, B, C, initial_states)
    device = x.device

    # 1. Time steps, as the recurrence uses them.
    dt_f = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)

    # 2. Lay the tokens out on chunks. Padding tokens have dt = 0 and x = B = C = 0: no decay, no input, no
    #    output, so the state passes through them unchanged and final states can be read after them.
    if bounds is None:
        # A row shorter than a chunk is one chunk of its own length: the result does not depend on the chunk length
        # beyond rounding, and a whole chunk of padding costs its [L, L] work (a 128-token row in chunks of 256).
        chunk_size = max(1, min(chunk_size, seqlen))
        length = math.ceil(seqlen / chunk_size) * chunk_size
        positions = torch.arange(seqlen, device=device)
        restart_chunks, final_chunks = [0], [length // chunk_size - 1]
        doc_ids = None
        if seq_idx is not None:
            doc_ids = document_ids(document_starts(batch, seqlen, seq_idx=seq_idx, device=device))
            doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(batch, length - seqlen)], dim=1)
    else:
        # Each document on whole chunks of its own: no chunk mixes two documents, so no masks are needed.
        positions, offsets, padded = document_chunk_layout(bounds, chunk_size, device)
        length = sum(padded)
        restart_chunks = [off // chunk_size for off in offsets]
        final_chunks = [(off + n) // chunk_size - 1 for off, n in zip(offsets, padded)]
        doc_ids = None

    def place(t):
        t = t.to(dtype)
        return t.new_zeros(t.shape[0], length, *t.shape[2:]).index_copy(1, positions, t)

    # 3. The state entering each document: its initial state, or zeros.
    if initial_states is None:
        num_states = batch if bounds is None else len(bounds) - 1
        initial_states = torch.zeros(num_states, heads, head_dim, state_size, dtype=dtype, device=device)
    initial_states = initial_states.to(dtype)
    if bounds is None:
        restarts = {0: initial_states}
    else:
        restarts = {chunk: initial_states[d : d + 1] for d, chunk in enumerate(restart_chunks)}

    # 4. The chunked scan, then back to the caller's token layout.
    y, finals = _ssd_chunks(place(x), place(dt_f), A.to(dtype), place(B), place(C), chunk_size, doc_ids,
                            restarts, final_chunks)
    y = _skip_and_gate(y[:, positions], x, D, z).to(x.dtype)
    if return_final_states:
        return y, torch.cat(finals, dim=0)
    return y


def ssd_naive_ref(
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
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    return_final_states=False,
):
    """The SSD recurrence one token at a time: the textbook definition, the ground truth of the tests.

    Same arguments and returns as :func:`ssd_chunked_scan_ref` (without ``chunk_size``). Slow (a Python loop over
    tokens) and memory-hungry under autograd; for tests and small inputs only.
    """
    bounds = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states, seq_idx, cu_seqlens)
    if bounds is not None:
        # Every document on its own, from its own initial state.
        outputs, finals = [], []
        for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            y_d, final_d = ssd_naive_ref(
                x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], D=D,
                z=None if z is None else z[:, start:end], dt_bias=dt_bias, dt_softplus=dt_softplus,
                dt_limit=dt_limit, initial_states=None if initial_states is None else initial_states[d : d + 1],
                return_final_states=True,
            )
            outputs.append(y_d)
            finals.append(final_d)
        y, final_states = torch.cat(outputs, dim=1), torch.cat(finals, dim=0)
        return (y, final_states) if return_final_states else y

    batch, seqlen, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    dtype = compute_dtype(x, dt, A, B, C, initial_states)
    dt_f = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    x_f, A_f = x.to(dtype), A.to(dtype)
    B_heads = B.to(dtype).repeat_interleave(per_group, dim=2)  # [B, T, H, N]: each head's own B_t
    C_heads = C.to(dtype).repeat_interleave(per_group, dim=2)
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, device=x.device)

    state = x_f.new_zeros(batch, heads, head_dim, B.shape[-1])
    if initial_states is not None:
        state = initial_states.to(dtype)
    outputs = []
    for t in range(seqlen):
        if t > 0:
            state = torch.where(starts[:, t, None, None, None], torch.zeros_like(state), state)
        decay = torch.exp(dt_f[:, t] * A_f)[:, :, None, None]
        state = decay * state + (dt_f[:, t, :, None] * x_f[:, t])[..., None] * B_heads[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C_heads[:, t]))
    y = _skip_and_gate(torch.stack(outputs, dim=1), x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


def check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, state_indices) -> None:
    """Shapes of one SSD decoding step; ValueError naming the argument."""
    check_tensor("x", x, "[B, H, P]")
    batch, heads, head_dim = x.shape
    check_tensor("dt", dt, "[B, H]", (batch, heads))
    check_tensor("B", B, "[B, G, N]")
    groups, state_size = B.shape[1], B.shape[2]
    if B.shape[0] != batch:
        raise ValueError(f"B must have shape [B, G, N] with B = {batch}, got {tuple(B.shape)}")
    _check_groups(heads, groups)
    check_tensor("C", C, "[B, G, N]", (batch, groups, state_size))
    if state_indices is None:
        check_tensor("state", state, "[B, H, P, N]", (batch, heads, head_dim, state_size))
    else:
        check_tensor("state_indices", state_indices, "[B]", (batch,), integer=True)
        check_tensor("state", state, "[slots, H, P, N]", (state.shape[0], heads, head_dim, state_size))
    _check_params(A, D, dt_bias, dt_limit, heads, head_dim)
    if z is not None:
        check_tensor("z", z, "[B, H, P]", x.shape)


def ssd_step_ref(
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
):
    """One token of the SSD recurrence (decoding). Pure: ``state`` is not modified.

    Args:
        state: [B, H, P, N] the state before this token.
        x: [B, H, P]; dt: [B, H]; A: [H]; B, C: [B, G, N]; D: [H] or [H, P]; z: [B, H, P]; dt_bias: [H];
        dt_softplus, dt_limit: as in :func:`ssd_chunked_scan_ref`.
        state_indices: [B] integer, optional: ``state`` is then a pool [slots, H, P, N] and row b starts from
            ``state[state_indices[b]]`` (continuous batching).
        A_is_log: ``A`` is Mamba-2's ``A_log`` = log(-A); the step uses -exp(A_log) computed in float32.

    Returns:
        (y [B, H, P] in x's dtype, new_state [B, H, P, N] in float32, or float64 for float64 inputs).
    """
    check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, state_indices)
    if state_indices is not None:
        state = state[state_indices]
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1], B.shape[2]
    dtype = compute_dtype(state, x, dt, A, B, C)
    per_group = heads // groups

    # 1. Discretise, 2. decay the state and add this token's input, 3. read out. Heads as [G, H/G] as in the scan.
    dt_f = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype).reshape(batch, groups, per_group)
    A = (-torch.exp(A.float()) if A_is_log else A).to(dtype)  # float32, as the mixers' own A
    decay = torch.exp(dt_f * A.reshape(groups, per_group))[..., None, None]
    x_f = x.to(dtype).reshape(batch, groups, per_group, head_dim)
    old = state.to(dtype).reshape(batch, groups, per_group, head_dim, state_size)
    new = decay * old + torch.einsum("bgrp,bgn->bgrpn", dt_f[..., None] * x_f, B.to(dtype))
    y = torch.einsum("bgrpn,bgn->bgrp", new, C.to(dtype)).reshape(batch, heads, head_dim)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return y, new.reshape(batch, heads, head_dim, state_size)
