"""Triton kernels for the backward pass of the chunked SSD scan (Mamba-2); the forward and the document layouts
(``DOC_MODE``) are in ``ssd_chunked_scan.py``. The launcher is called by ``ssm_hub.ops.ssd.custom_ops``.

The forward's intermediates (dt, a, the states entering each chunk, the scores S_ts = C_t . B_s) come from the
forward, which returns them. Per head and chunk, with dy the gradient of the gate's input (written by the forward output kernel run
in its GATE_BACKWARD mode), h_c the state entering chunk c and g_c the gradient of the state after it:

    y_t   = sum_{s <= t} S_ts exp(a_t - a_s) dt_s x_s + exp(a_t) C_t . h_c
    h_c+1 = exp(a_L) h_c + sum_s exp(a_L - a_s) dt_s x_s ⊗ B_s

1. ``ssd_chunked_scan_state_bwd_kernel``, per (row, head, block of P, block of N): the chunks in reverse order,
   g_c-1 = exp(a_L) g_c + sum_t exp(a_t) dy_t ⊗ C_t. It stores every g_c and gives the initial states' gradient.
2. ``ssd_chunked_scan_dx_bwd_kernel``, per (row, chunk, block of tokens s, head):
       dx_s  = dt_s acc_s + D dy_s,   acc_s = sum_{t >= s} S_ts exp(a_t - a_s) dy_t + exp(a_L - a_s) g_c B_s
       ddt_s = x_s . acc_s  (the direct part; the part through a comes in kernel 5)
3. ``ssd_chunked_scan_dscores_bwd_kernel``, per (row, chunk, group, [T, S] block): the scores' gradient summed
   over the group's heads, dS_ts = sum_heads exp(a_t - a_s) dt_s (dy_t . x_s).
4. ``ssd_chunked_scan_dB_dC_bwd_kernel``, per (row, chunk, block of tokens, group), one product each with dS:
       dB_s = sum_t dS_ts C_t + sum_heads exp(a_L - a_s) dt_s x_s g_c
       dC_t = sum_s dS_ts B_s + sum_heads exp(a_t) h_c^T dy_t
5. ``ssd_chunked_scan_dt_bwd_kernel``, per (row, chunk, head): the gradient of every a_t, then through the
   cumulative sum, softplus, bias and clamp of the forward's first kernel to dt, dA and dt_bias.

The gradient of a_t (per head) gathers every term where a_t appears: with W_ts = S_ts exp(a_t - a_s) dt_s
(dy_t . x_s), d a_t = sum_s W_ts - sum_t' W_t't (the row and column sums of W, kernel 2) + exp(a_t) dy_t . (h_c C_t)
(kernel 4); the chunk's last position a_L also gets exp(a_L) <g_c, h_c> (kernel 1) and
sum_s exp(a_L - a_s) dt_s x_s . (g_c B_s), which kernel 2 subtracts from each a_s.

Reductions over rows, chunks and heads (dD, dA, dt_bias, the chunk-end terms, the row sums of W) are written as
float32 partials, one per program, and summed afterwards: no float atomics, so the backward is deterministic, run
to run.
"""

import torch

# Imported inside try: transformers' trust_remote_code check then does not demand triton from a checkpoint's
# users on CPU-only machines, where ssm_hub.backend never dispatches to these kernels.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("ssm_hub's Triton kernels need triton: pip install triton") from error

from ssm_hub.kernels.activations import softplus  # noqa: E402  (after the guarded triton import)
from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2  # noqa: E402
from ssm_hub.kernels.ssd_chunked_scan import (  # noqa: E402
    STATE_BLOCK_N,
    block_sizes,
    chunk_block,
    chunk_bounds,
    chunk_documents,
    chunk_outputs,
    chunk_tokens,
    dot_config,
    launch,
    triangle_block,
)

# Launch settings per kernel, (num_warps, num_stages), tuned on an H100 with benchmarks/profiles/profile_scans.py (its
# last sweep at B8 x L2048: forward+backward 0.96 ms with dx_bwd at (4, 2), against 1.02 ms at (4, 1)).
LAUNCH = {"state_bwd": (4, 2), "dx_bwd": (4, 2), "dscores_bwd": (8, 2), "dB_dC_bwd": (4, 2), "dt_bwd": (4, 2)}


@triton.jit
def ssd_chunked_scan_state_bwd_kernel(
    dy_ptr, C_ptr, cum_ptr, doc_ptr, states_ptr, dfinal_ptr, dstates_ptr, dinitial_ptr, dcum_end_ptr,
    stride_dy_row, stride_dy_t, stride_dy_head, stride_dy_p,
    stride_C_row, stride_C_t, stride_C_group, stride_C_n,
    seqlen, heads, head_dim, state_size, heads_per_group, chunk_size, num_chunks,
    HAS_DFINAL: tl.constexpr, HAS_INITIAL: tl.constexpr, DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    tile_id = tl.program_id(2)
    group = head // heads_per_group
    n_blocks = tl.cdiv(state_size, BLOCK_N)
    p = (tile_id // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tile_id % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size
    tile = p_mask[:, None] & n_mask[None, :]
    state_tile = (head * head_dim + p[:, None]) * state_size + n[None, :]

    grad = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_DFINAL and DOC_MODE != 2:
        grad = tl.load(dfinal_ptr + row * heads * head_dim * state_size + state_tile, mask=tile, other=0.0)
    for step in range(num_chunks):
        chunk = num_chunks - 1 - step
        document, restarts, ends = chunk_bounds(doc_ptr, chunk, chunk_size, num_chunks, DOC_MODE)
        if DOC_MODE == 2:
            # Nothing flows back across a document's start: after its last chunk the gradient is its final
            # state's alone.
            if ends:
                grad = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
                if HAS_DFINAL:
                    grad = tl.load(dfinal_ptr + document * heads * head_dim * state_size + state_tile, mask=tile,
                                   other=0.0)
        states_offset = (row * num_chunks + chunk) * heads * head_dim * state_size + state_tile
        tl.store(dstates_ptr + states_offset, grad.to(dstates_ptr.dtype.element_ty), mask=tile)

        entering_doc, ending_doc = chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE)
        chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
        cum_end = tl.load(cum_ptr + chunk_offset + chunk_size - 1)
        decay = tl.exp(tl.minimum(cum_end, 0.0))
        if DOC_MODE == 1:
            decay = tl.where(entering_doc == ending_doc, decay, 0.0)
        entering = tl.load(states_ptr + states_offset, mask=tile, other=0.0).to(tl.float32)
        # This tile's share of d a_L = exp(a_L) <g_c, h_c>; [tiles, B, H, chunks].
        tl.store(dcum_end_ptr + ((tile_id * tl.num_programs(0) + row) * heads + head) * num_chunks + chunk,
                 decay * tl.sum(grad * entering))

        # What the chunk's outputs ask of its entering state: sum_t exp(a_t) dy_t ⊗ C_t, as (dy^T * w) @ C.
        local = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for t_start in range(0, chunk_size, BLOCK_T):
            l, t, t_valid = chunk_tokens(t_start, chunk, chunk_size, seqlen, BLOCK_T)
            from_entry = tl.exp(tl.minimum(tl.load(cum_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0), 0.0))
            if DOC_MODE == 1:
                docs = tl.load(doc_ptr + row * seqlen + t, mask=t_valid, other=-1)
                from_entry = tl.where(docs == entering_doc, from_entry, 0.0)
            dyt = tl.load(
                dy_ptr + row * stride_dy_row + t[None, :] * stride_dy_t + head * stride_dy_head
                + p[:, None] * stride_dy_p, mask=p_mask[:, None] & t_valid[None, :], other=0.0,
            )
            Ct = tl.load(
                C_ptr + row * stride_C_row + t[:, None] * stride_C_t + group * stride_C_group
                + n[None, :] * stride_C_n, mask=t_valid[:, None] & n_mask[None, :], other=0.0,
            )
            local += tl.dot((dyt.to(tl.float32) * from_entry[None, :]).to(DOT_DTYPE), Ct.to(DOT_DTYPE),
                            input_precision=DOT_PRECISION)
        grad = decay * grad + local
        if DOC_MODE == 2 and HAS_INITIAL:
            if restarts:
                tl.store(dinitial_ptr + document * heads * head_dim * state_size + state_tile, grad, mask=tile)
    if DOC_MODE != 2 and HAS_INITIAL:
        tl.store(dinitial_ptr + row * heads * head_dim * state_size + state_tile, grad, mask=tile)


@triton.jit
def ssd_chunked_scan_dx_bwd_kernel(
    x_ptr, B_ptr, scores_ptr, D_ptr, dy_ptr, dt_ptr, cum_ptr, doc_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, dcum_ptr, row_sums_ptr, dcum_end_ptr, dD_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    stride_dy_row, stride_dy_t, stride_dy_head, stride_dy_p,
    stride_dx_row, stride_dx_t, stride_dx_head,
    batch, seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, s_blocks,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_S tokens s of one chunk, one head, all P channels.
    program, row_chunk, row, chunk, s_block = chunk_block(s_blocks, num_chunks)
    head = tl.program_id(1).to(tl.int64)
    group = head // (heads // groups)
    l_s, s, s_valid = chunk_tokens(s_block * BLOCK_S, chunk, chunk_size, seqlen, BLOCK_S)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size
    sp_tile = s_valid[:, None] & p_mask[None, :]
    _, ending_doc = chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE)
    if DOC_MODE == 1:
        docs_s = tl.load(doc_ptr + row * seqlen + s, mask=s_valid, other=-1)

    chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
    dt_s = tl.load(dt_ptr + chunk_offset + l_s, mask=l_s < chunk_size, other=0.0)
    cum_s = tl.load(cum_ptr + chunk_offset + l_s, mask=l_s < chunk_size, other=0.0)
    cum_end = tl.load(cum_ptr + chunk_offset + chunk_size - 1)
    x_s = tl.load(
        x_ptr + row * stride_x_row + s[:, None] * stride_x_t + head * stride_x_head + p[None, :] * stride_x_p,
        mask=sp_tile, other=0.0,
    )
    B_s = tl.load(
        B_ptr + row * stride_B_row + s[:, None] * stride_B_t + group * stride_B_group + n[None, :] * stride_B_n,
        mask=s_valid[:, None] & n_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)

    # The chunk-state path: exp(a_L - a_s) g_c B_s, with g_c [P, N] the gradient of the state after the chunk.
    g = tl.load(
        dstates_ptr + (((row * num_chunks + chunk) * heads + head) * head_dim + p[:, None]) * state_size
        + n[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)
    to_end = tl.exp(tl.minimum(cum_end - cum_s, 0.0))
    if DOC_MODE == 1:
        to_end = tl.where(docs_s == ending_doc, to_end, 0.0)
    acc = tl.dot(B_s, tl.trans(g), input_precision=DOT_PRECISION) * to_end[:, None]  # [S, P]
    state_part = dt_s * tl.sum(x_s.to(tl.float32) * acc, axis=1)
    x_s = x_s.to(DOT_DTYPE)

    # The tokens t >= s of the chunk, in blocks, with W^T_st = (C_t . B_s) exp(a_t - a_s) dt_s (dy_t . x_s) [S, T]:
    # its column sums (over t) here, its row sums (over s) as this block's partial for kernel 4.
    column_sums = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for t_start in range(s_block * BLOCK_S, chunk_size, BLOCK_S):
        l_t, t, t_valid = chunk_tokens(t_start, chunk, chunk_size, seqlen, BLOCK_S)
        cum_t = tl.load(cum_ptr + chunk_offset + l_t, mask=l_t < chunk_size, other=0.0)
        causal = (l_t[None, :] >= l_s[:, None]) & t_valid[None, :] & s_valid[:, None]
        if DOC_MODE == 1:
            docs_t = tl.load(doc_ptr + row * seqlen + t, mask=t_valid, other=-1)
            causal &= docs_s[:, None] == docs_t[None, :]
        decay = tl.exp(tl.where(causal, cum_t[None, :] - cum_s[:, None], float("-inf")))
        # C_t . B_s as [S, T]: the transpose of the forward's scores block.
        scores = tl.load(scores_ptr + ((row_chunk * groups + group) * chunk_size + l_t[None, :]) * chunk_size
                         + l_s[:, None], mask=(l_t[None, :] < chunk_size) & (l_s[:, None] < chunk_size),
                         other=0.0).to(tl.float32)
        dy_t = tl.load(
            dy_ptr + row * stride_dy_row + t[:, None] * stride_dy_t + head * stride_dy_head
            + p[None, :] * stride_dy_p, mask=t_valid[:, None] & p_mask[None, :], other=0.0,
        ).to(DOT_DTYPE)
        acc += tl.dot((scores * decay).to(DOT_DTYPE), dy_t, input_precision=DOT_PRECISION)
        weights = tl.dot(x_s, tl.trans(dy_t), input_precision=DOT_PRECISION) * decay * dt_s[:, None] * scores
        column_sums += tl.sum(weights, axis=1)
        # [s_blocks, B, H, chunks, L]: written for t in this block's rows' reach, t >= the block's first s.
        tl.store(row_sums_ptr + (s_block * batch * heads * num_chunks * chunk_size + chunk_offset) + l_t,
                 tl.sum(weights, axis=0), mask=l_t < chunk_size)

    dy_s = tl.load(
        dy_ptr + row * stride_dy_row + s[:, None] * stride_dy_t + head * stride_dy_head + p[None, :] * stride_dy_p,
        mask=sp_tile, other=0.0,
    ).to(tl.float32)
    x_s = x_s.to(tl.float32)
    dx = dt_s[:, None] * acc
    if HAS_D:
        if D_HAS_HDIM:
            D = tl.load(D_ptr + head * head_dim + p, mask=p_mask, other=0.0).to(tl.float32)
            dx += D[None, :] * dy_s
        else:
            dx += tl.load(D_ptr + head).to(tl.float32) * dy_s
        # [B * chunks * s_blocks, H, P] partials of dD.
        tl.store(dD_ptr + (program * heads + head) * head_dim + p, tl.sum(dy_s * x_s, axis=0), mask=p_mask)
    # dx [B, T, H, P], P contiguous.
    tl.store(dx_ptr + row * stride_dx_row + s[:, None] * stride_dx_t + head * stride_dx_head + p[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=sp_tile)
    tl.store(ddt_ptr + chunk_offset + l_s, tl.sum(x_s * acc, axis=1), mask=l_s < chunk_size)
    tl.store(dcum_ptr + chunk_offset + l_s, -column_sums - state_part, mask=l_s < chunk_size)
    # [B, H, chunks, s_blocks]: this block's share of the chunk-end term.
    tl.store(dcum_end_ptr + ((row * heads + head) * num_chunks + chunk) * s_blocks + s_block, tl.sum(state_part))


@triton.jit
def ssd_chunked_scan_dscores_bwd_kernel(
    x_ptr, dy_ptr, dt_ptr, cum_ptr, doc_ptr, dscores_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_dy_row, stride_dy_t, stride_dy_head, stride_dy_p,
    seqlen, heads, head_dim, groups, chunk_size, num_chunks, t_blocks,
    DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # dS_ts = sum over the group's heads of exp(a_t - a_s) dt_s (dy_t . x_s), for one [T, S] block on or below the
    # diagonal: the gradient of the scores C_t . B_s, from which kernel 3 gets dB and dC in one product each.
    row, chunk, group, t_block, s_block = triangle_block(num_chunks, t_blocks)
    if s_block > t_block:
        return
    l_t, t, t_valid = chunk_tokens(t_block * BLOCK_T, chunk, chunk_size, seqlen, BLOCK_T)
    l_s, s, s_valid = chunk_tokens(s_block * BLOCK_T, chunk, chunk_size, seqlen, BLOCK_T)
    p = tl.arange(0, BLOCK_P)
    p_mask = p < head_dim
    causal = (l_t[:, None] >= l_s[None, :]) & t_valid[:, None] & s_valid[None, :]
    if DOC_MODE == 1:
        docs_t = tl.load(doc_ptr + row * seqlen + t, mask=t_valid, other=-1)
        docs_s = tl.load(doc_ptr + row * seqlen + s, mask=s_valid, other=-1)
        causal &= docs_t[:, None] == docs_s[None, :]

    heads_per_group = heads // groups
    dscores = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for head in range(group * heads_per_group, (group + 1) * heads_per_group):
        chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
        cum_t = tl.load(cum_ptr + chunk_offset + l_t, mask=l_t < chunk_size, other=0.0)
        cum_s = tl.load(cum_ptr + chunk_offset + l_s, mask=l_s < chunk_size, other=0.0)
        dt_s = tl.load(dt_ptr + chunk_offset + l_s, mask=l_s < chunk_size, other=0.0)
        dy_t = tl.load(
            dy_ptr + row * stride_dy_row + t[:, None] * stride_dy_t + head * stride_dy_head
            + p[None, :] * stride_dy_p, mask=t_valid[:, None] & p_mask[None, :], other=0.0,
        ).to(DOT_DTYPE)
        xt_s = tl.load(
            x_ptr + row * stride_x_row + s[None, :] * stride_x_t + head * stride_x_head + p[:, None] * stride_x_p,
            mask=p_mask[:, None] & s_valid[None, :], other=0.0,
        ).to(DOT_DTYPE)
        decay = tl.exp(tl.where(causal, cum_t[:, None] - cum_s[None, :], float("-inf")))
        dscores += tl.dot(dy_t, xt_s, input_precision=DOT_PRECISION) * decay * dt_s[None, :]
    # [B, chunks, G, L, L], in the scores' dtype: kernel 4 reads it as a tl.dot operand.
    row_chunk = row * num_chunks + chunk
    offsets = ((row_chunk * groups + group) * chunk_size + l_t[:, None]) * chunk_size + l_s[None, :]
    tl.store(dscores_ptr + offsets, dscores.to(dscores_ptr.dtype.element_ty), mask=(l_t[:, None] < chunk_size) & (l_s[None, :] < chunk_size))


@triton.jit
def ssd_chunked_scan_dB_dC_bwd_kernel(
    x_ptr, B_ptr, C_ptr, dy_ptr, cum_ptr, dt_ptr, doc_ptr, states_ptr, dstates_ptr, dscores_ptr, dB_ptr, dC_ptr,
    dcum_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    stride_C_row, stride_C_t, stride_C_group, stride_C_n,
    stride_dy_row, stride_dy_t, stride_dy_head, stride_dy_p,
    stride_dBC_row, stride_dBC_t, stride_dBC_group,
    seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, blocks,
    DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program_id(2) == 0: dB of BLOCK_T tokens (as s), from dS^T C and the chunk-state path of every head.
    # program_id(2) == 1: dC of BLOCK_T tokens (as t), from dS B and the entering state of every head; and each
    # head's d a_t share of that entering-state path, C_t . (exp(a_t) h_c^T dy_t).
    program, row_chunk, row, chunk, block = chunk_block(blocks, num_chunks)
    group = tl.program_id(1).to(tl.int64)
    for_C = tl.program_id(2) == 1
    l, t, valid = chunk_tokens(block * BLOCK_T, chunk, chunk_size, seqlen, BLOCK_T)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size
    entering_doc, ending_doc = chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE)
    if DOC_MODE == 1:
        docs = tl.load(doc_ptr + row * seqlen + t, mask=valid, other=-1)
    dscores_block = dscores_ptr + (row_chunk * groups + group) * chunk_size * chunk_size
    heads_per_group = heads // groups
    grad = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if for_C:
        C_t = tl.load(
            C_ptr + row * stride_C_row + t[:, None] * stride_C_t + group * stride_C_group + n[None, :] * stride_C_n,
            mask=valid[:, None] & n_mask[None, :], other=0.0,
        ).to(tl.float32)
        for s_start in range(0, (block + 1) * BLOCK_T, BLOCK_T):
            l_s, s, s_valid = chunk_tokens(s_start, chunk, chunk_size, seqlen, BLOCK_T)
            dscores = tl.load(dscores_block + l[:, None] * chunk_size + l_s[None, :],
                              mask=(l[:, None] >= l_s[None, :]) & valid[:, None] & s_valid[None, :], other=0.0)
            B_s = tl.load(
                B_ptr + row * stride_B_row + s[:, None] * stride_B_t + group * stride_B_group
                + n[None, :] * stride_B_n, mask=s_valid[:, None] & n_mask[None, :], other=0.0,
            ).to(DOT_DTYPE)
            grad += tl.dot(dscores.to(DOT_DTYPE), B_s, input_precision=DOT_PRECISION)
        for head in range(group * heads_per_group, (group + 1) * heads_per_group):
            chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
            from_entry = tl.exp(tl.minimum(tl.load(cum_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0), 0.0))
            if DOC_MODE == 1:
                from_entry = tl.where(docs == entering_doc, from_entry, 0.0)
            dy = tl.load(
                dy_ptr + row * stride_dy_row + t[:, None] * stride_dy_t + head * stride_dy_head
                + p[None, :] * stride_dy_p, mask=valid[:, None] & p_mask[None, :], other=0.0,
            )
            entering = tl.load(
                states_ptr + (((row * num_chunks + chunk) * heads + head) * head_dim + p[:, None]) * state_size
                + n[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0.0,
            ).to(DOT_DTYPE)
            from_state = tl.dot((dy.to(tl.float32) * from_entry[:, None]).to(DOT_DTYPE), entering,
                                input_precision=DOT_PRECISION)
            tl.store(dcum_ptr + chunk_offset + l, tl.sum(from_state * C_t, axis=1), mask=l < chunk_size)
            grad += from_state
        # dB and dC [B, T, G, N] with the same strides, N contiguous.
        tl.store(dC_ptr + row * stride_dBC_row + t[:, None] * stride_dBC_t + group * stride_dBC_group + n[None, :],
                 grad.to(dC_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])
    else:
        for t_start in range(block * BLOCK_T, chunk_size, BLOCK_T):
            l_t, t_other, t_valid = chunk_tokens(t_start, chunk, chunk_size, seqlen, BLOCK_T)
            # dS^T as [S, T].
            dscores = tl.load(dscores_block + l_t[None, :] * chunk_size + l[:, None],
                              mask=(l_t[None, :] >= l[:, None]) & t_valid[None, :] & valid[:, None], other=0.0)
            C_t = tl.load(
                C_ptr + row * stride_C_row + t_other[:, None] * stride_C_t + group * stride_C_group
                + n[None, :] * stride_C_n, mask=t_valid[:, None] & n_mask[None, :], other=0.0,
            ).to(DOT_DTYPE)
            grad += tl.dot(dscores.to(DOT_DTYPE), C_t, input_precision=DOT_PRECISION)
        for head in range(group * heads_per_group, (group + 1) * heads_per_group):
            chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
            cum = tl.load(cum_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0)
            dt = tl.load(dt_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0)
            weight = tl.exp(tl.minimum(tl.load(cum_ptr + chunk_offset + chunk_size - 1) - cum, 0.0)) * dt
            if DOC_MODE == 1:
                weight = tl.where(docs == ending_doc, weight, 0.0)
            x = tl.load(
                x_ptr + row * stride_x_row + t[:, None] * stride_x_t + head * stride_x_head + p[None, :] * stride_x_p,
                mask=valid[:, None] & p_mask[None, :], other=0.0,
            )
            g = tl.load(
                dstates_ptr + (((row * num_chunks + chunk) * heads + head) * head_dim + p[:, None]) * state_size
                + n[None, :], mask=p_mask[:, None] & n_mask[None, :], other=0.0,
            ).to(DOT_DTYPE)
            grad += tl.dot((x.to(tl.float32) * weight[:, None]).to(DOT_DTYPE), g, input_precision=DOT_PRECISION)
        tl.store(dB_ptr + row * stride_dBC_row + t[:, None] * stride_dBC_t + group * stride_dBC_group + n[None, :],
                 grad.to(dB_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def ssd_chunked_scan_dt_bwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, doc_ptr, dt_out_ptr, ddt_direct_ptr, dcum_x_ptr, dcum_C_ptr, row_sums_ptr,
    dcum_end_states_ptr, dcum_end_dx_ptr, ddt_ptr, dA_ptr, ddt_bias_ptr,
    stride_dt_row, stride_dt_t, stride_dt_head,
    batch, seqlen, heads, chunk_size, num_chunks, dt_min, dt_max, s_blocks, state_tiles,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr, DOC_MODE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    l = tl.arange(0, BLOCK_L)
    t = chunk * chunk_size + l
    in_chunk = l < chunk_size
    valid = in_chunk & (t < seqlen)
    if DOC_MODE == 2:
        valid &= tl.load(doc_ptr + row * seqlen + t, mask=valid, other=-1) >= 0

    # d a_t, then d(dt_u A) = sum_{t >= u} d a_t: a_t is the cumulative sum of dt_u A over the chunk.
    chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
    dcum = tl.load(dcum_x_ptr + chunk_offset + l, mask=in_chunk, other=0.0)
    dcum += tl.load(dcum_C_ptr + chunk_offset + l, mask=in_chunk, other=0.0)
    # The row sums of W, one partial per block of s at or before t's block.
    for s_block in range(s_blocks):
        dcum += tl.load(row_sums_ptr + s_block * batch * heads * num_chunks * chunk_size + chunk_offset + l,
                        mask=in_chunk & (l >= s_block * BLOCK_S), other=0.0)
    # The chunk-end term, from kernel 1's partials (one per state tile) and kernel 2's (one per block of s).
    end = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for tile in range(state_tiles):
        end += tl.load(dcum_end_states_ptr + ((tile * batch + row) * heads + head) * num_chunks + chunk)
    for s_block in range(s_blocks):
        end += tl.load(dcum_end_dx_ptr + ((row * heads + head) * num_chunks + chunk) * s_blocks + s_block)
    dcum += tl.where(l == chunk_size - 1, end, 0.0)
    dlog_decay = tl.cumsum(dcum, axis=0, reverse=True)
    dt = tl.load(dt_out_ptr + chunk_offset + l, mask=in_chunk, other=0.0)
    A = tl.load(A_ptr + head).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    ddt = tl.load(ddt_direct_ptr + chunk_offset + l, mask=in_chunk, other=0.0) + A * dlog_decay
    # [B, chunks, H] partials of dA (of d A_log = dA * A with A_IS_LOG, as A = -exp(A_log)).
    partial = (row * num_chunks + chunk) * heads + head
    dA = tl.sum(tl.where(valid, dt * dlog_decay, 0.0))
    if A_IS_LOG:
        dA *= A
    tl.store(dA_ptr + partial, dA)

    # Back through the clamp, softplus and bias of the forward's first kernel.
    raw = tl.load(dt_ptr + row * stride_dt_row + t * stride_dt_t + head * stride_dt_head, mask=valid, other=0.0)
    raw = raw.to(tl.float32)
    if HAS_DT_BIAS:
        raw += tl.load(dt_bias_ptr + head).to(tl.float32)
    before_clamp = raw
    if DT_SOFTPLUS:
        before_clamp = softplus(raw)
    ddt = tl.where(valid & (before_clamp >= dt_min) & (before_clamp <= dt_max), ddt, 0.0)
    if DT_SOFTPLUS:
        ddt *= tl.sigmoid(raw)
    # ddt is contiguous [B, T, H].
    tl.store(ddt_ptr + (row * seqlen + t) * heads + head, ddt.to(ddt_ptr.dtype.element_ty), mask=in_chunk & (t < seqlen))
    if HAS_DT_BIAS:
        tl.store(ddt_bias_ptr + partial, tl.sum(ddt))


def ssd_chunked_scan_bwd(dout, dfinal, x, dt, A, B, C, chunk_size: int, D, z, dt_bias, dt_softplus: bool,
                         dt_min: float, dt_max: float, initial_states, doc_ids, doc_mode: int, num_final: int,
                         dt_out, cum, states, scores, packed_xBC: bool = False, A_is_log: bool = False):
    """Gradients of ``ssd_chunked_scan_fwd`` for the upstream gradients ``dout`` (of y) and ``dfinal`` (of the
    final states, or None). ``dt_out``, ``cum``, ``states`` and ``scores`` are the intermediates that
    ``ssd_chunked_scan_fwd`` returned.

    ``packed_xBC``: dx, dB and dC are written into one [B, T, H * P + 2 * G * N] tensor, in that order (as Mamba-2's
    conv output holds x, B and C), which comes back in dx's place (None in dB's and dC's), so that no
    concatenation has to follow. ``A_is_log``: A is A_log, as in ``ssd_chunked_scan_fwd``, and dA is A_log's
    gradient.

    Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial) in the dtypes of the inputs, with None for the
    inputs that are None.
    """
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    num_chunks = cdiv(seqlen, chunk_size)
    device = x.device
    f32 = dict(device=device, dtype=torch.float32)
    sizes = block_sizes(chunk_size, head_dim, state_size)
    block_t, block_p, block_n = sizes["block_t"], next_power_of_2(max(16, head_dim)), sizes["block_n"]
    dots = dot_config(x.dtype)
    blocks = cdiv(chunk_size, block_t)

    # The gradient of the gate's input.
    dz = None
    dy = dout
    if z is not None:
        dy, dz = chunk_outputs(x, C, scores, D, z, dt_out, cum, doc_ids, doc_mode, chunk_size, states, dout=dout)

    # 1. Gradients of the states, chunk by chunk in reverse.
    state_block_n = min(block_n, STATE_BLOCK_N)
    tiles = cdiv(head_dim, sizes["block_p"]) * cdiv(state_size, state_block_n)
    dstates = torch.empty_like(states)  # in x's dtype, as the states: a tl.dot operand of kernel 2
    dinitial = torch.empty(initial_states.shape, **f32) if initial_states is not None else None
    dcum_end_states = torch.empty((tiles, batch, heads, num_chunks), **f32)
    ssd_chunked_scan_state_bwd_kernel[(batch, heads, tiles)](
        dy, C, cum, doc_ids, states, dfinal, dstates, dinitial, dcum_end_states,
        *dy.stride(), *C.stride(),
        seqlen, heads, head_dim, state_size, heads // groups, chunk_size, num_chunks,
        HAS_DFINAL=dfinal is not None, HAS_INITIAL=initial_states is not None, DOC_MODE=doc_mode,
        **dots, BLOCK_T=block_t, BLOCK_P=sizes["block_p"], BLOCK_N=state_block_n,
        **launch(LAUNCH["state_bwd"]),
    )

    # 2. dx, the direct part of ddt, and the row and column sums of W.
    if packed_xBC:
        dxBC = torch.empty((batch, seqlen, heads * head_dim + 2 * groups * state_size), device=device, dtype=x.dtype)
        dx, dB, dC = _unpack_xBC(dxBC, heads, head_dim, groups, state_size)
    else:
        dx = torch.empty(x.shape, device=device, dtype=x.dtype)
        dB = torch.empty((batch, seqlen, groups, state_size), device=device, dtype=B.dtype)
        dC = torch.empty((batch, seqlen, groups, state_size), device=device, dtype=C.dtype)
    ddt_direct = torch.empty_like(dt_out)
    dcum_x = torch.empty_like(dt_out)
    row_sums = torch.empty((blocks, *dt_out.shape), **f32)
    dcum_end_dx = torch.empty((batch, heads, num_chunks, blocks), **f32)
    dD_partials = torch.empty((batch * num_chunks * blocks, heads, head_dim), **f32) if D is not None else None
    ssd_chunked_scan_dx_bwd_kernel[(batch * num_chunks * blocks, heads)](
        x, B, scores, D, dy, dt_out, cum, doc_ids, dstates, dx, ddt_direct, dcum_x, row_sums, dcum_end_dx,
        dD_partials, *x.stride(), *B.stride(), *dy.stride(), *dx.stride()[:3],
        batch, seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, blocks,
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, DOC_MODE=doc_mode, **dots,
        BLOCK_S=block_t, BLOCK_P=block_p, BLOCK_N=block_n, **launch(LAUNCH["dx_bwd"]),
    )

    # 3. The gradient of the scores, then dB and dC from it.
    dscores = torch.empty_like(scores)
    ssd_chunked_scan_dscores_bwd_kernel[(batch * num_chunks, groups, blocks * blocks)](
        x, dy, dt_out, cum, doc_ids, dscores, *x.stride(), *dy.stride(),
        seqlen, heads, head_dim, groups, chunk_size, num_chunks, blocks,
        DOC_MODE=doc_mode, **dots, BLOCK_T=block_t, BLOCK_P=block_p, **launch(LAUNCH["dscores_bwd"]),
    )
    dcum_C = torch.empty_like(dt_out)
    ssd_chunked_scan_dB_dC_bwd_kernel[(batch * num_chunks * blocks, groups, 2)](
        x, B, C, dy, cum, dt_out, doc_ids, states, dstates, dscores, dB, dC, dcum_C,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dB.stride()[:3],
        seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, blocks,
        DOC_MODE=doc_mode, **dots, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
        **launch(LAUNCH["dB_dC_bwd"]),
    )

    # 4. ddt, dA, ddt_bias.
    ddt = torch.empty((batch, seqlen, heads), device=device, dtype=dt.dtype)
    dA_partials = torch.empty((batch, num_chunks, heads), **f32)
    ddt_bias_partials = torch.empty((batch, num_chunks, heads), **f32) if dt_bias is not None else None
    ssd_chunked_scan_dt_bwd_kernel[(batch, num_chunks, heads)](
        dt, A, dt_bias, doc_ids, dt_out, ddt_direct, dcum_x, dcum_C, row_sums, dcum_end_states, dcum_end_dx, ddt,
        dA_partials, ddt_bias_partials, *dt.stride(), batch, seqlen, heads, chunk_size, num_chunks, dt_min, dt_max,
        blocks, tiles,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, A_IS_LOG=A_is_log, DOC_MODE=doc_mode,
        BLOCK_L=sizes["block_l"],
        BLOCK_S=block_t, **launch(LAUNCH["dt_bwd"]),
    )

    def cast(tensor, like):
        return None if like is None else tensor.to(like.dtype)

    dD = None
    if D is not None:
        dD = dD_partials.sum(dim=0 if D.dim() == 2 else (0, 2))  # [H, P], or [H] for a D per head
    if packed_xBC:
        dx, dB, dC = dxBC, None, None
    return (
        dx, ddt, cast(dA_partials.sum(dim=(0, 1)), A), dB, dC, cast(dD, D), dz,
        None if dt_bias is None else cast(ddt_bias_partials.sum(dim=(0, 1)), dt_bias), cast(dinitial, initial_states),
    )


def _unpack_xBC(dxBC, heads: int, head_dim: int, groups: int, state_size: int):
    """dx [B, T, H, P], dB and dC [B, T, G, N] as views of dxBC [B, T, H * P + 2 * G * N]."""
    batch, seqlen, _ = dxBC.shape
    dx, dB, dC = dxBC.split([heads * head_dim, groups * state_size, groups * state_size], dim=-1)
    return (dx.view(batch, seqlen, heads, head_dim), dB.view(batch, seqlen, groups, state_size),
            dC.view(batch, seqlen, groups, state_size))
