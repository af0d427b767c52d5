"""Triton kernels for the selective scan (Mamba-1) over a sequence, forward and backward, with varlen and states.

Notation as ``ssm_hub.ops.selective_scan.reference``: u, delta [B, T, D], A [D, N], B, C [B, T, N], and per token

    dt_t = softplus(delta_t + delta_bias)      a_t = exp(dt_t A)      b_t = dt_t u_t B_t        ([D, N])
    h_t = a_t h_{t-1} + b_t                    y_t = (h_t . C_t + D u_t) * silu(z_t)

One program owns one batch row and BLOCK_D channels, holds their state [BLOCK_D, N] in float32 registers and walks
time in blocks of BLOCK_T tokens. A block is loaded as tiles ([BLOCK_T, BLOCK_D] of u, delta, z and [BLOCK_T, N] of
B, C), turned into a [BLOCK_T, BLOCK_D, N] tile of (a_t, b_t) and scanned along time with ``tl.associative_scan``
and the combine (a1, b1), (a2, b2) -> (a1 a2, b1 a2 + b2); the state entering the block enters as h_t = b*_t +
a*_t h_in, where (a*_t, b*_t) is the scan from the block's start. Under Triton's CPU interpreter, which runs
``tl.associative_scan`` one element at a time in Python, the same scan is done row by row (``SEQUENTIAL_SCAN``).

Documents. A per-token document id (``seq_idx``, or the document number from ``cu_seqlens``) marks where a document
starts (the id differs from the previous token's) and ends. At a start s > 0 the decay a_s is replaced by 0, so the
state restarts there; with ``cu_seqlens`` the document's own initial state h0 enters as the extra input a_s h0
(exactly the reference's entry). The row's first token needs nothing special: the state entering the row is the
row's initial state (or zero), which with ``cu_seqlens`` is the first document's. Final states are the states at the
last token of each row (the carry after the last block), or with ``cu_seqlens`` of each document.

Backward. The forward stores the state entering every block of CHUNK tokens (float32 checkpoints [B, T / CHUNK, D,
N]); the backward walks blocks of CHUNK tokens from the last to the first, recomputes the block's states from its
checkpoint and scans the adjoint G_t = dL/dh_t backwards in time:

    G_t = C_t dy'_t + a_{t+1} G_{t+1}       (a_{t+1} = 0 where t ends a document; + d final_state at document ends)

with dy' the gradient of the pre-gate output. Then, with a_t h_{t-1} = h_t - b_t (the part of h_t from the past,
the initial state at a document start included),

    dA += sum_t dt_t G_t (h_t - b_t)                d dt_t = sum_n (A G_t (h_t - b_t) + G_t B_t u_t)
    du_t = dt_t sum_n G_t B_t + D dy'_t              dB_t = sum_d G_t dt_t u_t       dC_t = sum_d h_t dy'_t
    d h0 = a_s G_s at the document's first token s   dD = sum_t dy'_t u_t            dz from y before the gate

Sums over channels (dB, dC) and over time and rows (dA, dD, d delta_bias) are written as float32 partial sums per
program (per block of channels, per row) that the launcher adds up in torch: no atomics, so gradients are bitwise
reproducible. Exponents are dt A as in the reference (not clamped). All arithmetic is float32; offsets are int64.
"""

import torch

# Imported inside try: transformers' trust_remote_code check then does not demand triton from a checkpoint's
# users on CPU-only machines, where ssm_hub.backend never dispatches to these kernels.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("ssm_hub's Triton kernels need triton: pip install triton") from error

from ssm_hub.kernels.interpreter import triton_interpreter_enabled  # noqa: E402  (after the guarded triton import)
from ssm_hub.kernels.activations import softplus  # noqa: E402
from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2, strides  # noqa: E402
from ssm_hub.kernels.varlen import document_numbers, num_states  # noqa: E402


@triton.jit
def _combine(a1, b1, a2, b2):
    # Segment 1 then segment 2 of h_t = a_t h_{t-1} + b_t: the decay through both, and what both add.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _linear_scan(a, b, BLOCK_T: tl.constexpr, REVERSE: tl.constexpr, SEQUENTIAL: tl.constexpr):
    """Scan of x_t = a_t x_{t-1} + b_t along axis 0 from x = 0 (x_t = a_t x_{t+1} + b_t when ``REVERSE``).

    Returns (the product of the a's so far, x), both shaped like ``a``.
    """
    if SEQUENTIAL:
        rows = tl.arange(0, BLOCK_T)[:, None, None]
        out_a = a
        out_b = b
        acc_a = tl.sum(a, axis=0)
        acc_b = tl.sum(b, axis=0)
        for i in tl.static_range(BLOCK_T):
            row = BLOCK_T - 1 - i if REVERSE else i
            here = rows == row
            a_i = tl.sum(tl.where(here, a, 0.0), axis=0)
            b_i = tl.sum(tl.where(here, b, 0.0), axis=0)
            if i == 0:
                acc_a = a_i
                acc_b = b_i
            else:
                acc_a = acc_a * a_i
                acc_b = acc_b * a_i + b_i
            out_a = tl.where(here, acc_a[None, :, :], out_a)
            out_b = tl.where(here, acc_b[None, :, :], out_b)
        return out_a, out_b
    else:
        return tl.associative_scan((a, b), 0, _combine, reverse=REVERSE)


@triton.jit
def _row_of(x, rows, row):
    """Row ``row`` of a [BLOCK_T, BLOCK_D, N] tile, as [BLOCK_D, N]."""
    return tl.sum(tl.where(rows == row, x, 0.0), axis=0)


@triton.jit
def _load_tile(ptr, t, cols, t_ok, col_ok, stride_t, stride_c):
    """A [BLOCK_T, BLOCK_COLS] tile of a [T, cols] slice, as float32 (0 outside)."""
    mask = t_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + t[:, None] * stride_t + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_dt(delta_row, t, d, t_ok, d_ok, stride_t, stride_d, bias,
             HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """(dt, delta + bias) [BLOCK_T, BLOCK_D]; dt is 0 past the sequence, so that tokens there change nothing."""
    x = _load_tile(delta_row, t, d, t_ok, d_ok, stride_t, stride_d)
    if HAS_DELTA_BIAS:
        x += bias[None, :]
    dt = x
    if DELTA_SOFTPLUS:
        dt = softplus(x)
    return tl.where(t_ok[:, None], dt, 0.0), x


@triton.jit
def _documents(doc_row, t, t_ok, seqlen, stride_doc_t, HAS_DOCS: tl.constexpr):
    """For tokens t [BLOCK_T]: (document id, first token of a document, last token of one), the flags False past T."""
    if HAS_DOCS:
        doc = tl.load(doc_row + t * stride_doc_t, mask=t_ok, other=0)
        prev = tl.load(doc_row + (t - 1) * stride_doc_t, mask=t_ok & (t > 0), other=0)
        after = tl.load(doc_row + (t + 1) * stride_doc_t, mask=t + 1 < seqlen, other=0)
        first = t_ok & ((t == 0) | (doc != prev))
        last = t_ok & ((t == seqlen - 1) | (doc != after))
        return doc.to(tl.int64), first, last
    else:
        return tl.zeros_like(t), t == 0, t == seqlen - 1


@triton.jit
def _block_states(
    u_row, delta_row, B_row, C_row, init_ptr, doc_row, h_in, A, bias,
    t, d, n, t_ok, d_ok, n_ok, seqlen,
    stride_u_t, stride_u_d, stride_delta_t, stride_delta_d, stride_B_t, stride_B_n, stride_C_t, stride_C_n,
    stride_init_s, stride_init_d, stride_init_n, stride_doc_t,
    HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr, HAS_INITIAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PER_DOC: tl.constexpr, BLOCK_T: tl.constexpr, SEQUENTIAL_SCAN: tl.constexpr,
):
    """Every state of one block of tokens from the state h_in [BLOCK_D, N] entering it.

    Returns (h, a, b, dt, delta + bias, u, B, C, doc, first, last): h, a, b [BLOCK_T, BLOCK_D, N] with b = dt u B
    (without any initial-state entry), dt, delta + bias, u [BLOCK_T, BLOCK_D], B, C [BLOCK_T, N], and the document
    flags of ``_documents``.
    """
    dt, x = _load_dt(delta_row, t, d, t_ok, d_ok, stride_delta_t, stride_delta_d, bias,
                     HAS_DELTA_BIAS, DELTA_SOFTPLUS)
    u = _load_tile(u_row, t, d, t_ok, d_ok, stride_u_t, stride_u_d)
    Bt = _load_tile(B_row, t, n, t_ok, n_ok, stride_B_t, stride_B_n)
    Ct = _load_tile(C_row, t, n, t_ok, n_ok, stride_C_t, stride_C_n)
    a = tl.exp(dt[:, :, None] * A[None, :, :])
    b = (dt * u)[:, :, None] * Bt[:, None, :]
    doc, first, last = _documents(doc_row, t, t_ok, seqlen, stride_doc_t, HAS_DOCS)
    decay = a
    inputs = b
    if HAS_DOCS:
        # A document starting inside the row forgets the state before it.
        restart = first & (t > 0)
        decay = tl.where(restart[:, None, None], 0.0, a)
        if HAS_INITIAL:
            if PER_DOC:
                if tl.max(restart.to(tl.int32), axis=0) > 0:
                    tile = restart[:, None, None] & (d_ok[:, None] & n_ok[None, :])[None, :, :]
                    h0 = tl.load(init_ptr + doc[:, None, None] * stride_init_s + d[None, :, None] * stride_init_d
                                 + n[None, None, :] * stride_init_n, mask=tile, other=0.0).to(tl.float32)
                    inputs = b + a * h0
    scan_a, scan_b = _linear_scan(decay, inputs, BLOCK_T, False, SEQUENTIAL_SCAN)
    h = scan_b + scan_a * h_in[None, :, :]
    return h, a, b, dt, x, u, Bt, Ct, doc, first, last


@triton.jit
def _channel_tile(d_block, dim, state_size, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(d, n, d_ok, n_ok, dn, dn_ok) of BLOCK_D channels from block ``d_block`` by the state: int64 channel and state
    indices, their masks, and the flat index d * N + n of each state entry with its mask."""
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    d_ok = d < dim
    n_ok = n < state_size
    return d, n, d_ok, n_ok, d[:, None] * state_size + n[None, :], d_ok[:, None] & n_ok[None, :]


@triton.jit
def _channel_parameters(A_ptr, delta_bias_ptr, D_ptr, stride_A_d, stride_A_n, d, n, d_ok, dn_ok,
                        HAS_DELTA_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(A [BLOCK_D, N], delta_bias [BLOCK_D], D [BLOCK_D]) of the program's channels in float32; zeros when absent."""
    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=dn_ok, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    return A, bias, skip


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, init_ptr, doc_ptr,
    y_ptr, final_ptr, ckpt_ptr,
    stride_u_b, stride_u_t, stride_u_d,
    stride_delta_b, stride_delta_t, stride_delta_d,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_t, stride_B_n,
    stride_C_b, stride_C_t, stride_C_n,
    stride_z_b, stride_z_t, stride_z_d,
    stride_init_s, stride_init_d, stride_init_n,
    stride_doc_b, stride_doc_t,
    stride_y_b, stride_y_t, stride_y_d,
    seqlen, dim, state_size, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL: tl.constexpr, HAS_DOCS: tl.constexpr, PER_DOC: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr,
    SEQUENTIAL_SCAN: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y for one row and BLOCK_D channels over all T, their final state(s) and their checkpoints."""
    row = tl.program_id(0).to(tl.int64)
    d, n, d_ok, n_ok, dn, dn_ok = _channel_tile(tl.program_id(1).to(tl.int64), dim, state_size, BLOCK_D, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)[:, None, None]

    A, bias, skip = _channel_parameters(A_ptr, delta_bias_ptr, D_ptr, stride_A_d, stride_A_n, d, n, d_ok, dn_ok,
                                        HAS_DELTA_BIAS, HAS_D, BLOCK_D)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_INITIAL:
        # The state entering the row: the row's, or with cu_seqlens the first document's.
        first_state = 0 if PER_DOC else row
        h = tl.load(init_ptr + first_state * stride_init_s + d[:, None] * stride_init_d + n[None, :] * stride_init_n,
                    mask=dn_ok, other=0.0).to(tl.float32)

    u_row = u_ptr + row * stride_u_b
    delta_row = delta_ptr + row * stride_delta_b
    B_row = B_ptr + row * stride_B_b
    C_row = C_ptr + row * stride_C_b
    doc_row = doc_ptr
    if HAS_DOCS:
        doc_row += row * stride_doc_b
    for t_start in range(0, seqlen, BLOCK_T):
        if SAVE_CHECKPOINTS:
            if t_start % CHUNK == 0:
                tl.store(ckpt_ptr + (row * num_chunks + t_start // CHUNK) * dim * state_size + dn, h, mask=dn_ok)
        t = t_start + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < seqlen
        hs, a, b, dt, x, u, Bt, Ct, doc, first, last = _block_states(
            u_row, delta_row, B_row, C_row, init_ptr, doc_row, h, A, bias, t, d, n, t_ok, d_ok, n_ok, seqlen,
            stride_u_t, stride_u_d, stride_delta_t, stride_delta_d, stride_B_t, stride_B_n, stride_C_t, stride_C_n,
            stride_init_s, stride_init_d, stride_init_n, stride_doc_t,
            HAS_DELTA_BIAS, DELTA_SOFTPLUS, HAS_INITIAL, HAS_DOCS, PER_DOC, BLOCK_T, SEQUENTIAL_SCAN,
        )

        # y = h . C + D u, gated by silu(z).
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        if HAS_D:
            y += skip[None, :] * u
        if HAS_Z:
            z = _load_tile(z_ptr + row * stride_z_b, t, d, t_ok, d_ok, stride_z_t, stride_z_d)
            y *= z * tl.sigmoid(z)
        tile = t_ok[:, None] & d_ok[None, :]
        tl.store(y_ptr + row * stride_y_b + t[:, None] * stride_y_t + d[None, :] * stride_y_d,
                 y.to(y_ptr.dtype.element_ty), mask=tile)

        if PER_DOC:
            if tl.max(last.to(tl.int32), axis=0) > 0:
                ends = last[:, None, None] & dn_ok[None, :, :]
                tl.store(final_ptr + doc[:, None, None] * dim * state_size + dn[None, :, :], hs, mask=ends)
        # Tokens past T have dt = 0: they keep the state, so the last row is the state after the block's last token.
        h = _row_of(hs, rows, BLOCK_T - 1)

    if not PER_DOC:
        tl.store(final_ptr + row * dim * state_size + dn, h, mask=dn_ok)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, init_ptr, doc_ptr, ckpt_ptr,
    dy_ptr, dfinal_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dinit_ptr,
    stride_u_b, stride_u_t, stride_u_d,
    stride_delta_b, stride_delta_t, stride_delta_d,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_t, stride_B_n,
    stride_C_b, stride_C_t, stride_C_n,
    stride_z_b, stride_z_t, stride_z_d,
    stride_init_s, stride_init_d, stride_init_n,
    stride_doc_b, stride_doc_t,
    stride_dy_b, stride_dy_t, stride_dy_d,
    stride_df_s, stride_df_d, stride_df_n,
    stride_du_b, stride_du_t, stride_du_d,
    stride_ddelta_b, stride_ddelta_t, stride_ddelta_d,
    stride_dz_b, stride_dz_t, stride_dz_d,
    seqlen, dim, state_size, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_INITIAL: tl.constexpr, HAS_DOCS: tl.constexpr, PER_DOC: tl.constexpr, HAS_DFINAL: tl.constexpr,
    SEQUENTIAL_SCAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Every gradient for one row and BLOCK_D channels, walking blocks of BLOCK_T (= the checkpoint interval) tokens
    backwards; partial sums of dB, dC [B, D blocks, T, N] and dA [B, D, N], dD, d delta_bias [B, D]."""
    row = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1).to(tl.int64)
    d, n, d_ok, n_ok, dn, dn_ok = _channel_tile(d_block, dim, state_size, BLOCK_D, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)[:, None, None]

    A, bias, skip = _channel_parameters(A_ptr, delta_bias_ptr, D_ptr, stride_A_d, stride_A_n, d, n, d_ok, dn_ok,
                                        HAS_DELTA_BIAS, HAS_D, BLOCK_D)

    u_row = u_ptr + row * stride_u_b
    delta_row = delta_ptr + row * stride_delta_b
    B_row = B_ptr + row * stride_B_b
    C_row = C_ptr + row * stride_C_b
    doc_row = doc_ptr
    if HAS_DOCS:
        doc_row += row * stride_doc_b
    g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # G at the first token after the block
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    num_d_blocks = tl.num_programs(1)
    for i in range(num_chunks):
        chunk = num_chunks - 1 - i
        t = chunk * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < seqlen
        tile = t_ok[:, None] & d_ok[None, :]

        # 1. The block's states again, from its checkpoint.
        h_in = tl.load(ckpt_ptr + (row * num_chunks + chunk) * dim * state_size + dn, mask=dn_ok, other=0.0)
        h, a, b, dt, x, u, Bt, Ct, doc, first, last = _block_states(
            u_row, delta_row, B_row, C_row, init_ptr, doc_row, h_in, A, bias, t, d, n, t_ok, d_ok, n_ok, seqlen,
            stride_u_t, stride_u_d, stride_delta_t, stride_delta_d, stride_B_t, stride_B_n, stride_C_t, stride_C_n,
            stride_init_s, stride_init_d, stride_init_n, stride_doc_t,
            HAS_DELTA_BIAS, DELTA_SOFTPLUS, HAS_INITIAL, HAS_DOCS, PER_DOC, BLOCK_T, SEQUENTIAL_SCAN,
        )

        # 2. The gradient of y before the gate, dy', and dz from y before the gate.
        dy = _load_tile(dy_ptr + row * stride_dy_b, t, d, t_ok, d_ok, stride_dy_t, stride_dy_d)
        if HAS_Z:
            z = _load_tile(z_ptr + row * stride_z_b, t, d, t_ok, d_ok, stride_z_t, stride_z_d)
            y = tl.sum(h * Ct[:, None, :], axis=2)
            if HAS_D:
                y += skip[None, :] * u
            sig = tl.sigmoid(z)
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + row * stride_dz_b + t[:, None] * stride_dz_t + d[None, :] * stride_dz_d,
                     dz.to(dz_ptr.dtype.element_ty), mask=tile)
            dy = dy * z * sig
        if HAS_D:
            dD += tl.sum(dy * u, axis=0)

        # 3. G_t = C_t dy'_t (+ d final_state at a last token) + a_{t+1} G_{t+1}, backwards through the block.
        c = dy[:, :, None] * Ct[:, None, :]
        if HAS_DFINAL:
            ends = last
            if not PER_DOC:
                ends = t == seqlen - 1
            if tl.max(ends.to(tl.int32), axis=0) > 0:
                state = doc if PER_DOC else tl.zeros_like(t) + row
                df = tl.load(dfinal_ptr + state[:, None, None] * stride_df_s + d[None, :, None] * stride_df_d
                             + n[None, None, :] * stride_df_n,
                             mask=ends[:, None, None] & dn_ok[None, :, :], other=0.0)
                c += df.to(tl.float32)
        dt_next, _ = _load_dt(delta_row, t + 1, d, t + 1 < seqlen, d_ok, stride_delta_t, stride_delta_d, bias,
                              HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        # Nothing flows back across the end of a document (or of the row).
        a_next = tl.where(last[:, None, None], 0.0, tl.exp(dt_next[:, :, None] * A[None, :, :]))
        decay_to_end, g_local = _linear_scan(a_next, c, BLOCK_T, True, SEQUENTIAL_SCAN)
        G = g_local + decay_to_end * g_next[None, :, :]
        g_next = _row_of(G, rows, 0)

        # 4. Gradients of the block's inputs; a_t h_{t-1} = h_t - b_t.
        past = G * (h - b)
        dA += tl.sum(past * dt[:, :, None], axis=0)
        GB = tl.sum(G * Bt[:, None, :], axis=2)
        du = dt * GB
        if HAS_D:
            du += skip[None, :] * dy
        ddt = tl.sum(past * A[None, :, :], axis=2) + u * GB
        if DELTA_SOFTPLUS:
            ddt = ddt * tl.sigmoid(x)
        ddt = tl.where(tile, ddt, 0.0)
        dbias += tl.sum(ddt, axis=0)
        tl.store(du_ptr + row * stride_du_b + t[:, None] * stride_du_t + d[None, :] * stride_du_d,
                 du.to(du_ptr.dtype.element_ty), mask=tile)
        tl.store(ddelta_ptr + row * stride_ddelta_b + t[:, None] * stride_ddelta_t + d[None, :] * stride_ddelta_d,
                 ddt.to(ddelta_ptr.dtype.element_ty), mask=tile)
        partial = ((row * num_d_blocks + d_block) * seqlen + t[:, None]) * state_size + n[None, :]
        tn_ok = t_ok[:, None] & n_ok[None, :]
        tl.store(dB_ptr + partial, tl.sum(G * (dt * u)[:, :, None], axis=1), mask=tn_ok)
        tl.store(dC_ptr + partial, tl.sum(h * dy[:, :, None], axis=1), mask=tn_ok)

        # 5. An initial state enters at its document's first token s as a_s h0.
        if HAS_INITIAL:
            enters = first
            if not PER_DOC:
                enters = t == 0
            if tl.max(enters.to(tl.int32), axis=0) > 0:
                state = doc if PER_DOC else tl.zeros_like(t) + row
                tl.store(dinit_ptr + state[:, None, None] * dim * state_size + dn[None, :, :], a * G,
                         mask=enters[:, None, None] & dn_ok[None, :, :])

    tl.store(dA_ptr + row * dim * state_size + dn, dA, mask=dn_ok)
    tl.store(dD_ptr + row * dim + d, dD, mask=d_ok)
    tl.store(dbias_ptr + row * dim + d, dbias, mask=d_ok)


# A program's [BLOCK_T, BLOCK_D, N] float32 tiles (several live at once) stay in registers: with N = 16 and
# BLOCK_T = 16 the tiles below give BLOCK_D = 16 channels in the forward and 8 in the backward, which holds about
# twice as many tiles. The default layout puts the tile's time axis inside each thread, so the scan along time is a
# sequential loop in registers. BLOCK_T of the backward is the checkpoint interval: the checkpoints take 4 / CHUNK
# bytes per element of [B, T, D, N], i.e. at N = 16 and CHUNK = 16 one float32 per element of u (100 MB at
# B 8 x T 2048 x D 1536), kept from the forward to the backward.
_GPU_CHUNK = 16
# (BLOCK_T, elements per tile, num_warps), from benchmarks/profiles/profile_scans.py --case mamba1 on an H100: forward
# 0.91 ms and forward+backward 8.5 ms at B8 x L2048 x D1536, N16, against 1.01 / 10.0 ms with (16, 8192, 8) and
# (16, 4096, 8).
_GPU_TILE = {"fwd": (16, 4096, 4), "bwd": (16, 2048, 4)}
# Triton's interpreter pays per operation, not per element, and its sequential scan costs BLOCK_T operations per
# block whatever the tile: larger tiles, still several blocks of T and D at the tests' sizes.
_INTERPRETER_CHUNK = 32
_INTERPRETER_TILE = {"fwd": (32, 4096, 1), "bwd": (32, 4096, 1)}


def checkpoint_chunk() -> int:
    """Tokens between two checkpoints of the forward (the backward's block of T)."""
    return _INTERPRETER_CHUNK if triton_interpreter_enabled() else _GPU_CHUNK


def checkpoint_shape(batch: int, seqlen: int, dim: int, state_size: int) -> tuple[int, int, int, int]:
    """Shape of the float32 checkpoints that ``selective_scan_fwd`` returns: the state entering every chunk."""
    return batch, cdiv(seqlen, checkpoint_chunk()), dim, state_size


def _tiles(direction: str, dim: int, state_size: int) -> dict:
    block_t, elements, num_warps = (_INTERPRETER_TILE if triton_interpreter_enabled() else _GPU_TILE)[direction]
    block_n = next_power_of_2(state_size)
    block_d = max(1, min(next_power_of_2(dim), elements // (block_t * block_n)))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps)


def _documents_tensor(u, seq_idx, cu_seqlens):
    """[B, T] integer document id per token for the kernels (None without varlen): seq_idx as it is, or the document
    number of every token of ``cu_seqlens`` (found on the device, no host sync)."""
    if cu_seqlens is None:
        return seq_idx
    return document_numbers(cu_seqlens, u.shape[1], u.device)


def _scan_flags(D, z, delta_bias, delta_softplus, initial_state, docs, cu_seqlens, sequential_scan):
    return dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, HAS_INITIAL=initial_state is not None, HAS_DOCS=docs is not None,
        PER_DOC=cu_seqlens is not None,
        SEQUENTIAL_SCAN=triton_interpreter_enabled() if sequential_scan is None else sequential_scan,
    )


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, initial_state, seq_idx, cu_seqlens,
                       save_checkpoints: bool = True, sequential_scan: bool | None = None):
    """Launch the forward kernel; arguments as ``ssm_hub.ops.selective_scan.selective_scan`` (any strides; ``D`` and
    ``delta_bias`` contiguous). ``sequential_scan`` forces the row-by-row scan on or off (default: on only under
    the interpreter).

    Returns (y [B, T, D] in u's dtype, final_state [B or S, D, N] float32, checkpoints float32 of
    :func:`checkpoint_shape`, or an empty tensor without ``save_checkpoints``).
    """
    batch, seqlen, dim = u.shape
    state_size = A.shape[1]
    docs = _documents_tensor(u, seq_idx, cu_seqlens)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty((batch, seqlen, dim), device=u.device, dtype=u.dtype)
    final = torch.empty((num_states(u.shape[0], cu_seqlens), dim, state_size), **f32)
    shape = checkpoint_shape(batch, seqlen, dim, state_size)
    checkpoints = torch.empty(shape if save_checkpoints else (0,), **f32)
    tiles = _tiles("fwd", dim, state_size)
    chunk = checkpoint_chunk()
    tiles["BLOCK_T"] = min(tiles["BLOCK_T"], chunk)
    if chunk % tiles["BLOCK_T"]:
        raise ValueError(f"the checkpoint interval ({chunk}) must be a multiple of the forward's BLOCK_T "
                         f"({tiles['BLOCK_T']})")
    grid = (batch, cdiv(dim, tiles["BLOCK_D"]))
    selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, docs, y, final, checkpoints,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *strides(z, 3),
        *strides(initial_state, 3), *strides(docs, 2), *y.stride(),
        seqlen, dim, state_size, shape[1],
        SAVE_CHECKPOINTS=save_checkpoints, CHUNK=chunk,
        **_scan_flags(D, z, delta_bias, delta_softplus, initial_state, docs, cu_seqlens, sequential_scan), **tiles,
    )
    return y, final, checkpoints


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, initial_state, seq_idx, cu_seqlens,
                       checkpoints, dy, dfinal_state, sequential_scan: bool | None = None):
    """Launch the backward kernel. ``checkpoints`` from :func:`selective_scan_fwd` on the same inputs; ``dy``
    [B, T, D]; ``dfinal_state`` [B or S, D, N] or None.

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, d initial_state), each in its input's dtype, None for an
    absent optional input.
    """
    batch, seqlen, dim = u.shape
    state_size = A.shape[1]
    if checkpoints.shape != checkpoint_shape(batch, seqlen, dim, state_size):
        raise ValueError(f"checkpoints must have shape {checkpoint_shape(batch, seqlen, dim, state_size)}, got "
                         f"{tuple(checkpoints.shape)} (was the forward run without save_checkpoints?)")
    docs = _documents_tensor(u, seq_idx, cu_seqlens)
    tiles = _tiles("bwd", dim, state_size)
    tiles["BLOCK_T"] = checkpoint_chunk()
    num_d_blocks = cdiv(dim, tiles["BLOCK_D"])
    device = u.device
    f32 = dict(device=device, dtype=torch.float32)
    du = torch.empty((batch, seqlen, dim), device=device, dtype=u.dtype)
    ddelta = torch.empty((batch, seqlen, dim), device=device, dtype=delta.dtype)
    dz = torch.empty((batch, seqlen, dim), device=device, dtype=z.dtype) if z is not None else None
    dB_partial = torch.empty((batch, num_d_blocks, seqlen, state_size), **f32)
    dC_partial = torch.empty((batch, num_d_blocks, seqlen, state_size), **f32)
    dA_partial = torch.empty((batch, dim, state_size), **f32)
    dD_partial = torch.empty((batch, dim), **f32)
    dbias_partial = torch.empty((batch, dim), **f32)
    dinit = None
    if initial_state is not None:
        dinit = torch.empty((num_states(u.shape[0], cu_seqlens), dim, state_size), **f32)
    selective_scan_bwd_kernel[(batch, num_d_blocks)](
        u, delta, A, B, C, D, z, delta_bias, initial_state, docs, checkpoints, dy, dfinal_state,
        du, ddelta, dz, dB_partial, dC_partial, dA_partial, dD_partial, dbias_partial, dinit,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *strides(z, 3),
        *strides(initial_state, 3), *strides(docs, 2), *dy.stride(), *strides(dfinal_state, 3),
        *du.stride(), *ddelta.stride(), *strides(dz, 3),
        seqlen, dim, state_size, checkpoints.shape[1],
        HAS_DFINAL=dfinal_state is not None,
        **_scan_flags(D, z, delta_bias, delta_softplus, initial_state, docs, cu_seqlens, sequential_scan), **tiles,
    )
    return (
        du,
        ddelta,
        dA_partial.sum(dim=0).to(A.dtype),
        dB_partial.sum(dim=1).to(B.dtype),
        dC_partial.sum(dim=1).to(C.dtype),
        dD_partial.sum(dim=0).to(D.dtype) if D is not None else None,
        dz,
        dbias_partial.sum(dim=0).to(delta_bias.dtype) if delta_bias is not None else None,
        dinit.to(initial_state.dtype) if initial_state is not None else None,
    )
