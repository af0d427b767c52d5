"""Triton kernels for the causal depthwise conv1d over time (channels last), forward and backward.

Notation as ``ssm_hub.ops.causal_conv1d.reference``: x [B, T, C], weight [C, K], and for token t

    z_t = bias + sum_{j < K} weight[:, K - 1 - j] * v_j(t)        y_t = act(z_t)

where tap j of token t, v_j(t), is the input j tokens back: x[t - j] while that is still in t's document, else
slot K - 1 - (j - (t - start)) of the document's initial state (when it has one), else zero.

Documents. A token's run r(t) = min(t - start of its document, K - 1) says everything a window needs: tap j
reads x when j <= r(t), else the initial state at slot K - 1 - j + r(t) (r(t) is exact there, being < j).
``seq_idx`` marks a document start wherever the id changes; ``cu_seqlens`` is turned into ``seq_idx`` = the
document number of each token, so the same loads give runs, the document's own initial state and its own final
state. Without varlen, or with ``seq_idx``, only a document starting at t = 0 reads the row's initial state.
Slot i of a final state is tap K - 2 - i of the document's (or row's) last token, stored by the forward program
that holds that token.

Backward, with g_t = dy_t * act'(z_t) (z recomputed from x, never stored by the forward):

    dweight[:, k] = sum_t g_t * v_{K-1-k}(t)            dbias = sum_t g_t
    dx[p] = sum_{s < K, s <= r(p + s)} weight[:, K - 1 - s] * g[p + s]      (+ d final_state where p is read)
    d initial_state[slot] = sum_{m <= slot} weight[:, slot - m] * g[start + m]   (+ d final_state of a short doc)

Three kernels: the first writes g (float32; with no activation g is dy and nothing is written) and this program's
partial sums of dweight and dbias into a float32 buffer that the launcher sums (no atomics: bitwise reproducible);
the second gathers dx from g; the third writes each initial state's gradient. All sums are in float32; offsets are
int64.
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
from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2, strides  # noqa: E402
from ssm_hub.kernels.varlen import document_numbers, num_states  # noqa: E402


@triton.jit
def _run_length(seq_ptr, stride_seq_b, stride_seq_t, row, t, seqlen, WIDTH: tl.constexpr,
                HAS_SEQ_IDX: tl.constexpr):
    """min(t - first token of t's document, WIDTH - 1) for tokens t >= 0 (any value where t >= seqlen)."""
    if HAS_SEQ_IDX:
        seq_row = seq_ptr + row * stride_seq_b
        here = tl.load(seq_row + t * stride_seq_t, mask=t < seqlen, other=0)
        same = t >= 0
        run = tl.zeros_like(t)
        for i in tl.static_range(1, WIDTH):
            back = t - i
            prev = tl.load(seq_row + back * stride_seq_t, mask=(back >= 0) & (back < seqlen), other=0)
            same = same & (back >= 0) & (prev == here)
            run += same.to(t.dtype)
            here = prev
        return run
    else:
        return tl.minimum(t, WIDTH - 1)


@triton.jit
def _doc_state(seq_ptr, stride_seq_b, stride_seq_t, row, t, run, seqlen, PER_DOC: tl.constexpr):
    """(index of the initial/final state of t's document, whether that document has an initial state)."""
    if PER_DOC:
        doc = tl.load(seq_ptr + row * stride_seq_b + t * stride_seq_t, mask=t < seqlen, other=0).to(tl.int64)
        return doc, t >= 0
    else:
        # Only a document that starts the row has one; where a tap needs the state, run is exact.
        return tl.zeros_like(t) + row, (t - run) == 0


@triton.jit
def _is_last(seq_ptr, stride_seq_b, stride_seq_t, row, t, doc, seqlen, PER_DOC: tl.constexpr):
    """Whether t ends its row (any mode) or its document (cu_seqlens): where final states are read."""
    last = t == seqlen - 1
    if PER_DOC:
        after = tl.load(seq_ptr + row * stride_seq_b + (t + 1) * stride_seq_t, mask=t + 1 < seqlen, other=0)
        last = last | ((t + 1 < seqlen) & (after.to(tl.int64) != doc))
    return last


@triton.jit
def _tap(x_row, state_ptr, t, t_ok, c, c_ok, j: tl.constexpr, run, state_idx, state_ok, any_state,
         stride_x_t, stride_x_c, stride_s_n, stride_s_c, stride_s_k, WIDTH: tl.constexpr, HAS_STATE: tl.constexpr):
    """v_j(t) as a float32 [BT, BC] tile: x j tokens back, the initial state before the document, or 0.

    ``t``, ``t_ok``, ``run``, ``state_idx``, ``state_ok`` are [BT, 1]; ``c``, ``c_ok`` are [1, BC]. ``any_state``
    (a scalar) says whether any token of the tile reads an initial state at all.
    """
    inside = t_ok & (j <= run)
    v = tl.load(x_row + (t - j) * stride_x_t + c * stride_x_c, mask=inside & c_ok, other=0.0).to(tl.float32)
    if HAS_STATE:
        if any_state:
            before = t_ok & (j > run) & state_ok
            slot_offset = state_idx * stride_s_n + (WIDTH - 1 - j + run) * stride_s_k
            s = tl.load(state_ptr + slot_offset + c * stride_s_c, mask=before & c_ok, other=0.0)
            v += s.to(tl.float32)
    return v


@triton.jit
def _window(seq_ptr, stride_seq_b, stride_seq_t, row, t, seqlen, WIDTH: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
            PER_DOC: tl.constexpr):
    """For tokens t [BT]: (run, state index, has-state, whether any token of them reads an initial state)."""
    run = _run_length(seq_ptr, stride_seq_b, stride_seq_t, row, t, seqlen, WIDTH, HAS_SEQ_IDX)
    state_idx, state_ok = _doc_state(seq_ptr, stride_seq_b, stride_seq_t, row, t, run, seqlen, PER_DOC)
    reads_state = (t < seqlen) & (run < WIDTH - 1) & state_ok
    return run, state_idx, state_ok, tl.sum(reads_state.to(tl.int32), axis=0) > 0


@triton.jit
def causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, seq_ptr, y_ptr, final_ptr,
    stride_x_b, stride_x_t, stride_x_c,
    stride_w_c, stride_w_k,
    stride_s_n, stride_s_c, stride_s_k,
    stride_seq_b, stride_seq_t,
    stride_y_b, stride_y_t, stride_y_c,
    stride_f_n, stride_f_c, stride_f_k,
    seqlen, channels,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_STATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, PER_DOC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y for a (block of T, row, block of C) tile, and the final states of the last tokens in it."""
    row = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < seqlen
    c_ok = c < channels
    x_row = x_ptr + row * stride_x_b

    # 1. Each token's document: its run, the state it starts from and ends in, whether it is a last token.
    run, state_idx, state_ok, any_state = _window(seq_ptr, stride_seq_b, stride_seq_t, row, t, seqlen, WIDTH,
                                                  HAS_SEQ_IDX, PER_DOC)
    last = _is_last(seq_ptr, stride_seq_b, stride_seq_t, row, t, state_idx, seqlen, PER_DOC)
    any_last = tl.sum(last.to(tl.int32), axis=0) > 0
    t2, t_ok2, run2 = t[:, None], t_ok[:, None], run[:, None]
    state_idx2, state_ok2 = state_idx[:, None], state_ok[:, None]
    c2, c_ok2 = c[None, :], c_ok[None, :]

    # 2. Weighted sum of the taps, oldest first; taps 1 .. K - 1 of a last token are its final state.
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c2, mask=c_ok2, other=0.0).to(tl.float32)
    for k in tl.static_range(WIDTH):
        v = _tap(x_row, state_ptr, t2, t_ok2, c2, c_ok2, WIDTH - 1 - k, run2, state_idx2, state_ok2, any_state,
                 stride_x_t, stride_x_c, stride_s_n, stride_s_c, stride_s_k, WIDTH, HAS_STATE)
        w = tl.load(w_ptr + c2 * stride_w_c + k * stride_w_k, mask=c_ok2, other=0.0).to(tl.float32)
        acc += v * w
        if k >= 1:
            if any_last:
                slot_offset = state_idx2 * stride_f_n + (k - 1) * stride_f_k
                tl.store(final_ptr + slot_offset + c2 * stride_f_c, v.to(final_ptr.dtype.element_ty),
                         mask=last[:, None] & c_ok2)

    # 3. Activation, output in the output's dtype.
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + row * stride_y_b + t2 * stride_y_t + c2 * stride_y_c, acc.to(y_ptr.dtype.element_ty),
             mask=t_ok2 & c_ok2)


@triton.jit
def causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, seq_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr,
    stride_x_b, stride_x_t, stride_x_c,
    stride_w_c, stride_w_k,
    stride_s_n, stride_s_c, stride_s_k,
    stride_seq_b, stride_seq_t,
    stride_dy_b, stride_dy_t, stride_dy_c,
    stride_g_b, stride_g_t, stride_g_c,
    seqlen, channels, steps,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_STATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, PER_DOC: tl.constexpr, K_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """g = dy * act'(z) for ``steps`` blocks of T of one row and a block of C (stored when the activation is silu),
    and this program's partial sums of dweight [C, K] and dbias [C]."""
    row = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    c2, c_ok2 = c[None, :], c_ok[None, :]
    x_row = x_ptr + row * stride_x_b
    # Products summed elementwise over the steps and reduced over T once at the end: a reduction across the
    # tile's rows goes between warps, and five of them a step were most of this kernel's time.
    taps = tl.arange(0, K_BLOCK)[:, None, None]
    dw = tl.zeros((K_BLOCK, BLOCK_T, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)

    for step in range(steps):
        t = (tl.program_id(0).to(tl.int64) * steps + step) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < seqlen
        run, state_idx, state_ok, any_state = _window(seq_ptr, stride_seq_b, stride_seq_t, row, t, seqlen, WIDTH,
                                                      HAS_SEQ_IDX, PER_DOC)
        t2, t_ok2, run2 = t[:, None], t_ok[:, None], run[:, None]
        state_idx2, state_ok2 = state_idx[:, None], state_ok[:, None]
        tile_ok = t_ok2 & c_ok2

        # 1. g, recomputing the pre-activation z for silu.
        g = tl.load(dy_ptr + row * stride_dy_b + t2 * stride_dy_t + c2 * stride_dy_c, mask=tile_ok,
                    other=0.0).to(tl.float32)
        if SILU:
            z = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            if HAS_BIAS:
                z += tl.load(b_ptr + c2, mask=c_ok2, other=0.0).to(tl.float32)
            for k in tl.static_range(WIDTH):
                w = tl.load(w_ptr + c2 * stride_w_c + k * stride_w_k, mask=c_ok2, other=0.0).to(tl.float32)
                z += w * _tap(x_row, state_ptr, t2, t_ok2, c2, c_ok2, WIDTH - 1 - k, run2, state_idx2, state_ok2,
                              any_state, stride_x_t, stride_x_c, stride_s_n, stride_s_c, stride_s_k, WIDTH, HAS_STATE)
            sig = tl.sigmoid(z)
            g = g * sig * (1.0 + z * (1.0 - sig))
            tl.store(g_ptr + row * stride_g_b + t2 * stride_g_t + c2 * stride_g_c, g, mask=tile_ok)

        # 2. dbias and dweight: g and g times each tap, summed over T below.
        db += g
        for k in tl.static_range(WIDTH):
            v = _tap(x_row, state_ptr, t2, t_ok2, c2, c_ok2, WIDTH - 1 - k, run2, state_idx2, state_ok2, any_state,
                     stride_x_t, stride_x_c, stride_s_n, stride_s_c, stride_s_k, WIDTH, HAS_STATE)
            dw += tl.where(taps == k, (g * v)[None, :, :], 0.0)

    partial = row * tl.num_programs(0) + tl.program_id(0)
    tl.store(db_ptr + partial * channels + c, tl.sum(db, axis=0), mask=c_ok)
    tap_ids = tl.arange(0, K_BLOCK)[:, None]
    tl.store(dw_ptr + (partial * channels + c2) * WIDTH + tap_ids, tl.sum(dw, axis=1),
             mask=(tap_ids < WIDTH) & c_ok2)


@triton.jit
def causal_conv1d_bwd_dx_kernel(
    w_ptr, seq_ptr, g_ptr, dfinal_ptr, dx_ptr,
    stride_w_c, stride_w_k,
    stride_seq_b, stride_seq_t,
    stride_g_b, stride_g_t, stride_g_c,
    stride_df_n, stride_df_c, stride_df_k,
    stride_dx_b, stride_dx_t, stride_dx_c,
    seqlen, channels,
    WIDTH: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, PER_DOC: tl.constexpr, HAS_DFINAL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx for a (block of T, row, block of C) tile: token q = p + s reads x[p] through its tap s when p is still in
    q's document (run(q) >= s), and a last token q's final state holds x[p] in slot K - 2 - s."""
    row = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    c2, c_ok2 = c[None, :], c_ok[None, :]
    g_row = g_ptr + row * stride_g_b

    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for s in tl.static_range(WIDTH):
        q = p + s
        q_ok = q < seqlen
        run = _run_length(seq_ptr, stride_seq_b, stride_seq_t, row, q, seqlen, WIDTH, HAS_SEQ_IDX)
        reads = q_ok & (run >= s)
        w = tl.load(w_ptr + c2 * stride_w_c + (WIDTH - 1 - s) * stride_w_k, mask=c_ok2, other=0.0).to(tl.float32)
        g = tl.load(g_row + q[:, None] * stride_g_t + c2 * stride_g_c, mask=reads[:, None] & c_ok2, other=0.0)
        dx += w * g.to(tl.float32)
        if HAS_DFINAL:
            if s < WIDTH - 1:
                state_idx, _ = _doc_state(seq_ptr, stride_seq_b, stride_seq_t, row, q, run, seqlen, PER_DOC)
                take = reads & _is_last(seq_ptr, stride_seq_b, stride_seq_t, row, q, state_idx, seqlen, PER_DOC)
                slot_offset = state_idx * stride_df_n + (WIDTH - 2 - s) * stride_df_k
                df = tl.load(dfinal_ptr + slot_offset[:, None] + c2 * stride_df_c, mask=take[:, None] & c_ok2,
                             other=0.0)
                dx += df.to(tl.float32)

    tl.store(dx_ptr + row * stride_dx_b + p[:, None] * stride_dx_t + c2 * stride_dx_c, dx.to(dx_ptr.dtype.element_ty),
             mask=(p < seqlen)[:, None] & c_ok2)


@triton.jit
def causal_conv1d_bwd_initial_state_kernel(
    w_ptr, seq_ptr, cu_ptr, g_ptr, dfinal_ptr, dstate_ptr,
    stride_w_c, stride_w_k,
    stride_seq_b, stride_seq_t,
    stride_g_b, stride_g_t, stride_g_c,
    stride_df_n, stride_df_c, stride_df_k,
    stride_ds_n, stride_ds_c, stride_ds_k,
    seqlen, channels,
    WIDTH: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, PER_DOC: tl.constexpr, HAS_DFINAL: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d initial_state for one state (a row's, or a cu_seqlens document's) and a block of C."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    if PER_DOC:
        row = n * 0
        start = tl.load(cu_ptr + n).to(tl.int64)
    else:
        row = n
        start = n * 0

    # 1. g at the document's first K - 1 tokens: only they reach into the state.
    m = tl.arange(0, BLOCK_S).to(tl.int64)
    q = start + m
    run = _run_length(seq_ptr, stride_seq_b, stride_seq_t, row, q, seqlen, WIDTH, HAS_SEQ_IDX)
    in_doc = (m < WIDTH - 1) & (q < seqlen) & (run >= m)
    g = tl.load(g_ptr + row * stride_g_b + q[:, None] * stride_g_t + c[None, :] * stride_g_c,
                mask=in_doc[:, None] & c_ok[None, :], other=0.0).to(tl.float32)

    # 2. d state[slot] = sum_{m <= slot} weight[:, slot - m] * g[m], as a [slot, m, C] product summed over m.
    slot = tl.arange(0, BLOCK_S).to(tl.int64)
    lag = slot[:, None] - m[None, :]
    pair_ok = (lag >= 0) & (slot < WIDTH - 1)[:, None]
    w = tl.load(w_ptr + c[None, None, :] * stride_w_c + lag[:, :, None] * stride_w_k,
                mask=pair_ok[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
    acc = tl.sum(w * g[None, :, :], axis=1)

    # 3. A document shorter than K - 1 ends in a final state that still holds part of this state.
    if HAS_DFINAL:
        # The document's length, exact when < K - 1 (as a vector: the interpreter mishandles scalar & vector masks).
        length = tl.sum(in_doc.to(tl.int64), axis=0) + tl.zeros_like(slot)
        has_final = length < WIDTH - 1
        if not PER_DOC:
            has_final = has_final & (length == seqlen)
        src = slot - length
        take = (src >= 0) & (slot < WIDTH - 1) & has_final
        acc += tl.load(dfinal_ptr + n * stride_df_n + c[None, :] * stride_df_c + src[:, None] * stride_df_k,
                       mask=take[:, None] & c_ok[None, :], other=0.0).to(tl.float32)

    tl.store(dstate_ptr + n * stride_ds_n + c[None, :] * stride_ds_c + slot[:, None] * stride_ds_k,
             acc.to(dstate_ptr.dtype.element_ty), mask=(slot < WIDTH - 1)[:, None] & c_ok[None, :])


def _tiles() -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of the forward and dx kernels: tiles of BLOCK_C channels (contiguous in memory) by BLOCK_T
    tokens. 32 x 128 with 4 warps was the fastest of a sweep of 16-64 tokens by 64-256 channels and 2-8 warps for
    both, at the 130M Mamba-2's training shape on an H100 (8 x 2048 tokens, 1792 channels, read from in_proj's
    output). Triton's CPU interpreter pays per operation rather than per element, so there tiles are larger (still
    several blocks and programs at the tests' T = 257)."""
    if triton_interpreter_enabled():
        return 128, 64
    return 32, 128


def _dweight_tiles() -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_C, blocks of T per program at most, num_warps) of the dweight pass, which holds a
    [K, BLOCK_T, BLOCK_C] float32 accumulator. Walking several blocks per program keeps its partial buffer small
    next to x. 16 x 128, 8 blocks, 4 warps: 0.252 ms at the 130M training shape on an H100, the fastest of 16-32
    tokens by 64-256 channels, 4-8 warps and 8-16 blocks (the kernel that reduced every block took 0.383 ms)."""
    if triton_interpreter_enabled():
        return 128, 64, 2, 4
    return 16, 128, 8, 4


def causal_conv1d_fwd(x, weight, bias, initial_state, seq_idx, cu_seqlens, silu: bool):
    """Launch the forward kernel; arguments as ``ssm_hub.ops.causal_conv1d.causal_conv1d``.

    Returns (y [B, T, C] in x's dtype, final_state [B or S, C, K - 1] in x's dtype).
    """
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    per_doc = cu_seqlens is not None
    if per_doc:
        seq_idx = document_numbers(cu_seqlens, seqlen, x.device)
    y = torch.empty((batch, seqlen, channels), device=x.device, dtype=x.dtype)
    final = torch.empty((num_states(batch, cu_seqlens), channels, width - 1), device=x.device, dtype=x.dtype)
    block_t, block_c = _tiles()
    block_t, block_c = min(block_t, next_power_of_2(seqlen)), min(block_c, next_power_of_2(channels))
    grid = (cdiv(seqlen, block_t), batch, cdiv(channels, block_c))
    causal_conv1d_fwd_kernel[grid](
        x, weight, bias, initial_state, seq_idx, y, final,
        *x.stride(), *weight.stride(), *strides(initial_state, 3), *strides(seq_idx, 2), *y.stride(),
        *final.stride(),
        seqlen, channels,
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, HAS_STATE=initial_state is not None,
        HAS_SEQ_IDX=seq_idx is not None, PER_DOC=per_doc, BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return y, final


def causal_conv1d_bwd(x, weight, bias, initial_state, seq_idx, cu_seqlens, silu: bool, dy, dfinal):
    """Launch the backward kernels. ``dy`` [B, T, C]; ``dfinal`` [B or S, C, K - 1] or None.

    Returns (dx in x's dtype, dweight in weight's dtype, dbias in bias's dtype (float32 without bias),
    d initial_state in its dtype or None).
    """
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    per_doc = cu_seqlens is not None
    if per_doc:
        seq_idx = document_numbers(cu_seqlens, seqlen, x.device)
    varlen = dict(WIDTH=width, HAS_SEQ_IDX=seq_idx is not None, PER_DOC=per_doc)
    block_t, block_c = _tiles()
    block_t, block_c = min(block_t, next_power_of_2(seqlen)), min(block_c, next_power_of_2(channels))
    num_c = cdiv(channels, block_c)

    # 1. g (silu only: without an activation g is dy), dweight and dbias.
    dw_block_t, dw_block_c, max_steps, dw_warps = _dweight_tiles()
    dw_block_t = min(dw_block_t, next_power_of_2(seqlen))
    dw_block_c = min(dw_block_c, next_power_of_2(channels))
    dw_blocks = cdiv(seqlen, dw_block_t)
    num_chunks = cdiv(dw_blocks, max_steps)
    steps = cdiv(dw_blocks, num_chunks)
    g = torch.empty((batch, seqlen, channels), device=x.device, dtype=torch.float32) if silu else dy
    dw_partial = torch.empty((batch * num_chunks, channels, width), device=x.device, dtype=torch.float32)
    db_partial = torch.empty((batch * num_chunks, channels), device=x.device, dtype=torch.float32)
    causal_conv1d_bwd_kernel[(num_chunks, batch, cdiv(channels, dw_block_c))](
        x, weight, bias, initial_state, seq_idx, dy, g, dw_partial, db_partial,
        *x.stride(), *weight.stride(), *strides(initial_state, 3), *strides(seq_idx, 2), *dy.stride(),
        *g.stride(), seqlen, channels, steps,
        HAS_BIAS=bias is not None, SILU=silu, HAS_STATE=initial_state is not None,
        K_BLOCK=next_power_of_2(width), BLOCK_T=dw_block_t, BLOCK_C=dw_block_c, num_warps=dw_warps, **varlen,
    )
    dweight = dw_partial.sum(dim=0).to(weight.dtype)
    dbias = db_partial.sum(dim=0).to(bias.dtype if bias is not None else torch.float32)

    # 2. dx.
    dx = torch.empty((batch, seqlen, channels), device=x.device, dtype=x.dtype)
    causal_conv1d_bwd_dx_kernel[(cdiv(seqlen, block_t), batch, num_c)](
        weight, seq_idx, g, dfinal, dx,
        *weight.stride(), *strides(seq_idx, 2), *g.stride(), *strides(dfinal, 3), *dx.stride(),
        seqlen, channels,
        HAS_DFINAL=dfinal is not None, BLOCK_T=block_t, BLOCK_C=block_c, **varlen,
    )

    # 3. d initial_state.
    dstate = None
    if initial_state is not None:
        dstate = torch.empty(initial_state.shape, device=x.device, dtype=initial_state.dtype)
        causal_conv1d_bwd_initial_state_kernel[(initial_state.shape[0], num_c)](
            weight, seq_idx, cu_seqlens, g, dfinal, dstate,
            *weight.stride(), *strides(seq_idx, 2), *g.stride(), *strides(dfinal, 3), *dstate.stride(),
            seqlen, channels,
            HAS_DFINAL=dfinal is not None, BLOCK_S=max(2, next_power_of_2(width - 1)), BLOCK_C=block_c,
            **varlen,
        )
    return dx, dweight, dbias, dstate
