"""Triton kernels for the forward pass of the chunked SSD scan (Mamba-2); the backward is in
``ssd_chunked_scan_bwd.py``. The launchers are called by ``ssm_hub.ops.ssd.custom_ops``.

The algorithm is ``_ssd_chunks`` of ``ssm_hub.ops.ssd.reference``, in four kernels over chunks of L tokens:

1. ``ssd_chunked_scan_dt_fwd_kernel``, per (row, chunk, head): the discretised dt and the cumulative log decay
   a_t = sum_{u <= t} dt_u A from the chunk's start.
2. ``ssd_chunked_scan_state_fwd_kernel``, per (row, head, block of P, block of N): one pass over the chunks in
   order. It stores the state entering each chunk, then adds what the chunk contributes,
   h <- exp(a_L) h + sum_s exp(a_L - a_s) dt_s x_s ⊗ B_s, so the per-chunk contributions never go to memory.
3. ``ssd_chunked_scan_scores_fwd_kernel``, per (row, chunk, group, [T, S] block): the scores C_t . B_s, once for
   all the heads of a group.
4. ``ssd_chunked_scan_output_fwd_kernel``, per (row, chunk, block of tokens, head, block of P):
   y_t = sum_{s <= t} exp(a_t - a_s) (C_t . B_s) dt_s x_s + exp(a_t) C_t . h_in + D x_t, gated by silu(z_t).
   The same kernel serves the backward: it recomputes the gate's input and writes the gate's gradients.

Kernels 2 to 4 walk a chunk in blocks of at most ``MAX_BLOCK_L`` tokens, so that a chunk of 256 (Mamba-2's
default) needs [64, 64] score tiles rather than [256, 256].

Documents (``DOC_MODE``), from ``doc_ids`` [B, T] int32 made by ``ssm_hub.ops.ssd.custom_ops``:

- ``NO_DOCS``: each row is one document.
- ``DOC_MASKS`` (``seq_idx``): doc_ids numbers the documents of each row in order (0, 0, 1, 1, 1, 2 ...), and
  documents may start anywhere. As in the reference, no decay path joins two documents, the state entering a
  chunk reaches only the tokens of the document it belongs to, and a chunk adds to the state after it only the
  tokens of its last document (and then its entering state does not pass through). Initial and final states are
  per row.
- ``DOC_CHUNKS`` (``cu_seqlens``): every document lies on whole chunks of its own in one row, padded with tokens
  whose doc id is -1; doc_ids holds the document's number, which indexes its initial and final state. A chunk
  whose first token's document differs from the previous chunk's restarts from that document's initial state,
  and the state after a document's last chunk is its final state.

Tokens past T, and padding tokens, are read as dt = x = B = C = 0: they decay nothing and add nothing. Exponents
are masked before exp (s > t, where a_t - a_s > 0, becomes -inf), so every exponent is <= 0. Products go through
tl.dot in the inputs' dtype (bf16 / fp16: tensor cores; fp32: "ieee", since tf32 would lose ~3 digits) with
float32 accumulation. dt and a are float32; the entering states and the scores are stored in the inputs' dtype
(their readers use them as tl.dot operands of that dtype), the final states in float32. Offsets are int64.
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

# The most tokens of a chunk that one tile of kernels 2 to 4 holds: [64, 64] score blocks, not [L, L].
MAX_BLOCK_L = 64
# The state kernel splits P and N into blocks of at most this many for parallelism over (row, head, P, N): B * H
# alone is too few programs for a GPU at small batch.
STATE_BLOCK_P = 64
STATE_BLOCK_N = 64

NO_DOCS, DOC_MASKS, DOC_CHUNKS = 0, 1, 2

# Launch settings per kernel, (num_warps, num_stages), tuned on an H100 with benchmarks/profiles/profile_scans.py.
LAUNCH = {"dt": (4, 2), "state": (4, 1), "scores": (4, 2), "output": (4, 1)}


@triton.jit
def chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE: tl.constexpr):
    """(entering, ending): the document of the state entering ``chunk`` and of its last token (DOC_MASKS)."""
    if DOC_MODE == 1:
        row_docs = doc_ptr + row * seqlen
        entering = tl.load(row_docs + tl.maximum(chunk * chunk_size - 1, 0))
        ending = tl.load(row_docs + tl.minimum(chunk * chunk_size + chunk_size, seqlen) - 1)
    else:
        entering = 0
        ending = 0
    return entering, ending


@triton.jit
def chunk_tokens(start, chunk, chunk_size, seqlen, BLOCK: tl.constexpr):
    """(l, t, valid) of BLOCK tokens from ``start`` inside ``chunk``: their index in the chunk, in the row, and
    whether they are real tokens (inside the chunk and before the row's end)."""
    l = start + tl.arange(0, BLOCK)
    t = chunk * chunk_size + l
    return l, t, (l < chunk_size) & (t < seqlen)


@triton.jit
def chunk_block(blocks, num_chunks):
    """(program, row_chunk, row, chunk, block) of a program whose axis 0 runs over rows x chunks x ``blocks`` blocks
    of a chunk: its index on that axis, its row and chunk as one index, the row, the chunk, and its block."""
    program = tl.program_id(0).to(tl.int64)
    row_chunk = program // blocks
    return program, row_chunk, row_chunk // num_chunks, row_chunk % num_chunks, program % blocks


@triton.jit
def triangle_block(num_chunks, t_blocks):
    """(row, chunk, group, t_block, s_block) of a program of the [T, S] block grids (rows x chunks, groups,
    t_blocks x t_blocks): the block's row and chunk, its group, and its block of T and of S. The caller returns at
    once where s_block > t_block, above the diagonal."""
    row_chunk = tl.program_id(0).to(tl.int64)
    return (row_chunk // num_chunks, row_chunk % num_chunks, tl.program_id(1).to(tl.int64),
            tl.program_id(2) // t_blocks, tl.program_id(2) % t_blocks)


@triton.jit
def chunk_bounds(doc_ptr, chunk, chunk_size, num_chunks, DOC_MODE: tl.constexpr):
    """(document, restarts, ends) of a chunk in DOC_CHUNKS layout (row 0): its document, whether the document
    starts with this chunk, whether it ends with it."""
    if DOC_MODE == 2:
        document = tl.load(doc_ptr + chunk * chunk_size)
        previous = tl.load(doc_ptr + tl.maximum(chunk - 1, 0) * chunk_size)
        following = tl.load(doc_ptr + tl.minimum(chunk + 1, num_chunks - 1) * chunk_size)
        restarts = (chunk == 0) | (previous != document)
        ends = (chunk == num_chunks - 1) | (following != document)
    else:
        document = 0
        restarts = chunk == 0
        ends = chunk == num_chunks - 1
    return document, restarts, ends


@triton.jit
def ssd_chunked_scan_dt_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, doc_ptr, dt_out_ptr, cum_ptr,
    stride_dt_row, stride_dt_t, stride_dt_head,
    seqlen, heads, chunk_size, num_chunks, dt_min, dt_max,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr, DOC_MODE: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    l, t, valid = chunk_tokens(0, chunk, chunk_size, seqlen, BLOCK_L)
    if DOC_MODE == 2:
        valid &= tl.load(doc_ptr + row * seqlen + t, mask=valid, other=-1) >= 0

    dt = tl.load(dt_ptr + row * stride_dt_row + t * stride_dt_t + head * stride_dt_head, mask=valid, other=0.0)
    dt = dt.to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + head).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    # Tokens past the sequence, padding, and the padded end of the block neither decay nor add anything.
    dt = tl.where(valid, dt, 0.0)
    A = tl.load(A_ptr + head).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    cum = tl.cumsum(dt * A, axis=0)

    # Both [B, H, chunks, L], float32.
    offsets = ((row * heads + head) * num_chunks + chunk) * chunk_size + l
    tl.store(dt_out_ptr + offsets, dt, mask=l < chunk_size)
    tl.store(cum_ptr + offsets, cum, mask=l < chunk_size)


@triton.jit
def ssd_chunked_scan_state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, cum_ptr, doc_ptr, initial_ptr, states_ptr, final_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    stride_init_row, stride_init_head, stride_init_p, stride_init_n,
    seqlen, heads, head_dim, state_size, heads_per_group, chunk_size, num_chunks,
    HAS_INITIAL: tl.constexpr, DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    group = head // heads_per_group
    n_blocks = tl.cdiv(state_size, BLOCK_N)
    p = (tl.program_id(2) // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(2) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size
    tile = p_mask[:, None] & n_mask[None, :]

    init_tile = p[:, None] * stride_init_p + n[None, :] * stride_init_n + head * stride_init_head
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_INITIAL and DOC_MODE != 2:
        state = tl.load(initial_ptr + row * stride_init_row + init_tile, mask=tile, other=0.0).to(tl.float32)
    state_tile = p[:, None] * state_size + n[None, :]
    for chunk in range(num_chunks):
        document, restarts, ends = chunk_bounds(doc_ptr, chunk, chunk_size, num_chunks, DOC_MODE)
        if DOC_MODE == 2:
            # A document's first chunk starts from the document's own initial state (or zeros).
            if restarts:
                state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
                if HAS_INITIAL:
                    state = tl.load(initial_ptr + document * stride_init_row + init_tile, mask=tile,
                                    other=0.0).to(tl.float32)
        # [B, chunks, H, P, N], float32: the state entering each chunk.
        tl.store(states_ptr + ((row * num_chunks + chunk) * heads + head) * head_dim * state_size + state_tile,
                 state.to(states_ptr.dtype.element_ty), mask=tile)

        entering_doc, ending_doc = chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE)
        chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
        cum_end = tl.load(cum_ptr + chunk_offset + chunk_size - 1)
        contribution = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for s_start in range(0, chunk_size, BLOCK_S):
            s, t, s_valid = chunk_tokens(s_start, chunk, chunk_size, seqlen, BLOCK_S)
            dt = tl.load(dt_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
            cum = tl.load(cum_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
            # a_L - a_s <= 0 for tokens of the chunk; the padded ones have weight 0 through dt anyway.
            weight = tl.exp(tl.minimum(cum_end - cum, 0.0)) * dt
            if DOC_MODE == 1:
                docs = tl.load(doc_ptr + row * seqlen + t, mask=s_valid, other=-1)
                weight = tl.where(docs == ending_doc, weight, 0.0)
            # x^T as [P, S] and B as [S, N]: the contribution is (x^T * weight) @ B.
            xt = tl.load(
                x_ptr + row * stride_x_row + t[None, :] * stride_x_t + head * stride_x_head + p[:, None] * stride_x_p,
                mask=p_mask[:, None] & s_valid[None, :], other=0.0,
            )
            Bs = tl.load(
                B_ptr + row * stride_B_row + t[:, None] * stride_B_t + group * stride_B_group + n[None, :] * stride_B_n,
                mask=s_valid[:, None] & n_mask[None, :], other=0.0,
            )
            contribution += tl.dot((xt.to(tl.float32) * weight[None, :]).to(DOT_DTYPE), Bs.to(DOT_DTYPE),
                                   input_precision=DOT_PRECISION)
        decay = tl.exp(tl.minimum(cum_end, 0.0))
        if DOC_MODE == 1:
            # A document starting inside the chunk cuts the path of the entering state to the chunk's end.
            decay = tl.where(entering_doc == ending_doc, decay, 0.0)
        state = decay * state + contribution
        if DOC_MODE == 2:
            if ends:
                tl.store(final_ptr + ((document * heads + head) * head_dim + p[:, None]) * state_size + n[None, :],
                         state, mask=tile)
    if DOC_MODE != 2:
        tl.store(final_ptr + ((row * heads + head) * head_dim + p[:, None]) * state_size + n[None, :], state,
                 mask=tile)


@triton.jit
def ssd_chunked_scan_scores_fwd_kernel(
    C_ptr, B_ptr, scores_ptr,
    stride_C_row, stride_C_t, stride_C_group, stride_C_n,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    seqlen, state_size, chunk_size, num_chunks, t_blocks,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # C_t . B_s for one [T, S] block of one chunk and group, on and below the diagonal (s <= t): the kernels that
    # read it never look above.
    row, chunk, group, t_block, s_block = triangle_block(num_chunks, t_blocks)
    if s_block > t_block:
        return
    l_t, t, t_valid = chunk_tokens(t_block * BLOCK_T, chunk, chunk_size, seqlen, BLOCK_T)
    l_s, s, s_valid = chunk_tokens(s_block * BLOCK_T, chunk, chunk_size, seqlen, BLOCK_T)
    scores = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for n_start in range(0, state_size, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < state_size
        Ct = tl.load(
            C_ptr + row * stride_C_row + t[:, None] * stride_C_t + group * stride_C_group + n[None, :] * stride_C_n,
            mask=t_valid[:, None] & n_mask[None, :], other=0.0,
        ).to(DOT_DTYPE)
        Bt = tl.load(
            B_ptr + row * stride_B_row + s[None, :] * stride_B_t + group * stride_B_group + n[:, None] * stride_B_n,
            mask=n_mask[:, None] & s_valid[None, :], other=0.0,
        ).to(DOT_DTYPE)
        scores += tl.dot(Ct, Bt, input_precision=DOT_PRECISION)
    # [B, chunks, G, L, L].
    row_chunk = row * num_chunks + chunk
    offsets = ((row_chunk * tl.num_programs(1) + group) * chunk_size + l_t[:, None]) * chunk_size + l_s[None, :]
    tl.store(scores_ptr + offsets, scores.to(scores_ptr.dtype.element_ty), mask=(l_t[:, None] < chunk_size) & (l_s[None, :] < chunk_size))


@triton.jit
def ssd_chunked_scan_output_fwd_kernel(
    x_ptr, C_ptr, scores_ptr, D_ptr, z_ptr, dt_ptr, cum_ptr, doc_ptr, states_ptr, y_ptr, dout_ptr, dz_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_C_row, stride_C_t, stride_C_group, stride_C_n,
    stride_z_row, stride_z_t, stride_z_head, stride_z_p,
    stride_dout_row, stride_dout_t, stride_dout_head, stride_dout_p,
    seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, t_blocks,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, GATE_BACKWARD: tl.constexpr,
    DOC_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_T tokens of one chunk (l counted from the chunk's start), one head, BLOCK_P channels.
    # With GATE_BACKWARD it recomputes the gate's input y and, from dout, writes dy = dout silu(z) into y_ptr
    # (same layout as x) and dz = dout y silu'(z) into dz_ptr (z's layout); otherwise it writes the output.
    program, row_chunk, row, chunk, t_block = chunk_block(t_blocks, num_chunks)
    t_start = t_block * BLOCK_T
    head = tl.program_id(1).to(tl.int64)
    group = head // (heads // groups)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    l, t, t_valid = chunk_tokens(t_start, chunk, chunk_size, seqlen, BLOCK_T)
    p_mask = p < head_dim
    n_mask = n < state_size

    chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
    cum = tl.load(cum_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0)
    Ct = tl.load(
        C_ptr + row * stride_C_row + t[:, None] * stride_C_t + group * stride_C_group + n[None, :] * stride_C_n,
        mask=t_valid[:, None] & n_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)
    entering_doc, _ = chunk_documents(doc_ptr, row, chunk, chunk_size, seqlen, DOC_MODE)
    if DOC_MODE == 1:
        docs_t = tl.load(doc_ptr + row * seqlen + t, mask=t_valid, other=-1)

    # 1. The state entering the chunk, read as [N, P]: exp(a_t) C_t . h_in, for the tokens of its document.
    entering = tl.load(
        states_ptr + ((row_chunk * heads + head) * head_dim + p[None, :]) * state_size + n[:, None],
        mask=n_mask[:, None] & p_mask[None, :], other=0.0,
    )
    from_entry = tl.exp(tl.minimum(cum, 0.0))
    if DOC_MODE == 1:
        from_entry = tl.where(docs_t == entering_doc, from_entry, 0.0)
    y = tl.dot(Ct, entering.to(DOT_DTYPE), input_precision=DOT_PRECISION) * from_entry[:, None]

    # 2. Inside the chunk, over the tokens s <= t: decay from s to t, masked to s <= t before exp so that every
    #    exponent is <= 0, times (C_t . B_s) dt_s x_s.
    s_end = tl.minimum(t_start + BLOCK_T, chunk_size)
    for s_start in range(0, s_end, BLOCK_T):
        s, ts, s_valid = chunk_tokens(s_start, chunk, chunk_size, seqlen, BLOCK_T)
        dt_s = tl.load(dt_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        cum_s = tl.load(cum_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        # The [T, S] block of C_t . B_s.
        scores = tl.load(scores_ptr + ((row_chunk * groups + group) * chunk_size + l[:, None]) * chunk_size
                         + s[None, :], mask=(l[:, None] < chunk_size) & (s[None, :] < chunk_size),
                         other=0.0).to(tl.float32)
        x_s = tl.load(
            x_ptr + row * stride_x_row + ts[:, None] * stride_x_t + head * stride_x_head + p[None, :] * stride_x_p,
            mask=s_valid[:, None] & p_mask[None, :], other=0.0,
        ).to(DOT_DTYPE)
        causal = (l[:, None] >= s[None, :]) & (l[:, None] < chunk_size) & (s[None, :] < chunk_size)
        if DOC_MODE == 1:
            docs_s = tl.load(doc_ptr + row * seqlen + ts, mask=s_valid, other=-1)
            causal &= docs_t[:, None] == docs_s[None, :]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum_s[None, :], float("-inf")))
        weights = scores * decay * dt_s[None, :]
        y += tl.dot(weights.to(DOT_DTYPE), x_s, input_precision=DOT_PRECISION)

    # 3. Skip connection and gate.
    x_offsets = row * stride_x_row + t[:, None] * stride_x_t + head * stride_x_head + p[None, :] * stride_x_p
    tile = t_valid[:, None] & p_mask[None, :]
    if HAS_D:
        x = tl.load(x_ptr + x_offsets, mask=tile, other=0.0).to(tl.float32)
        if D_HAS_HDIM:
            D = tl.load(D_ptr + head * head_dim + p, mask=p_mask, other=0.0).to(tl.float32)
            y += D[None, :] * x
        else:
            y += tl.load(D_ptr + head).to(tl.float32) * x
    # y_ptr is always contiguous [B, T, H, P].
    y_offsets = ((row * seqlen + t[:, None]) * heads + head) * head_dim + p[None, :]
    if HAS_Z:
        z_offsets = row * stride_z_row + t[:, None] * stride_z_t + head * stride_z_head + p[None, :] * stride_z_p
        z = tl.load(z_ptr + z_offsets, mask=tile, other=0.0).to(tl.float32)
        gate = tl.sigmoid(z)
        if GATE_BACKWARD:
            dout = tl.load(
                dout_ptr + row * stride_dout_row + t[:, None] * stride_dout_t + head * stride_dout_head
                + p[None, :] * stride_dout_p, mask=tile, other=0.0,
            ).to(tl.float32)
            # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z))).
            dz = dout * y * gate * (1.0 + z * (1.0 - gate))
            tl.store(dz_ptr + y_offsets, dz.to(dz_ptr.dtype.element_ty), mask=tile)
            y = dout * z * gate
        else:
            y *= z * gate
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=tile)


def launch(settings: tuple[int, int]) -> dict:
    """(num_warps, num_stages) as launch keyword arguments."""
    num_warps, num_stages = settings
    return dict(num_warps=num_warps, num_stages=num_stages)


def dot_config(dtype: torch.dtype) -> dict:
    """The operand dtype and precision of tl.dot: bf16 / fp16 inputs go to the tensor cores as they are; fp32
    inputs keep fp32 products ("ieee": tf32 would lose ~3 digits). Triton's CPU interpreter multiplies bf16 / fp16
    operands wrongly (triton 3.9), so there every product is fp32."""
    if dtype == torch.float32 or triton_interpreter_enabled():
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, DOT_PRECISION="tf32")


def block_sizes(chunk_size: int, head_dim: int, state_size: int) -> dict:
    """The tile sizes shared by the forward and backward kernels: tl.dot needs every dim >= 16."""
    block_l = max(16, next_power_of_2(chunk_size))
    return dict(
        block_l=block_l,
        block_t=min(block_l, MAX_BLOCK_L),
        block_p=max(16, min(64, next_power_of_2(head_dim))),
        block_n=max(16, next_power_of_2(state_size)),
    )


def discretize_dt(dt, A, dt_bias, doc_ids, doc_mode: int, chunk_size: int, dt_softplus: bool, dt_min: float,
                  dt_max: float, A_is_log: bool):
    """Kernel 1: (dt, a) as [B, H, chunks, L] float32."""
    batch, seqlen, heads = dt.shape
    num_chunks = cdiv(seqlen, chunk_size)
    dt_out = torch.empty((batch, heads, num_chunks, chunk_size), device=dt.device, dtype=torch.float32)
    cum = torch.empty_like(dt_out)
    ssd_chunked_scan_dt_fwd_kernel[(batch, num_chunks, heads)](
        dt, A, dt_bias, doc_ids, dt_out, cum, *dt.stride(),
        seqlen, heads, chunk_size, num_chunks, dt_min, dt_max,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, A_IS_LOG=A_is_log, DOC_MODE=doc_mode,
        BLOCK_L=block_sizes(chunk_size, 1, 1)["block_l"], **launch(LAUNCH["dt"]),
    )
    return dt_out, cum


def pass_states(x, B, dt_out, cum, doc_ids, doc_mode: int, chunk_size: int, initial_states, num_final: int):
    """Kernel 2: (states entering each chunk [B, chunks, H, P, N] in x's dtype, final states [num_final, H, P, N]
    float32)."""
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    num_chunks = cdiv(seqlen, chunk_size)
    sizes = block_sizes(chunk_size, head_dim, state_size)
    block_p, block_n = min(sizes["block_p"], STATE_BLOCK_P), min(sizes["block_n"], STATE_BLOCK_N)
    f32 = dict(device=x.device, dtype=torch.float32)
    # In the inputs' dtype: its readers multiply it as a tl.dot operand of that dtype.
    states = torch.empty((batch, num_chunks, heads, head_dim, state_size), device=x.device, dtype=x.dtype)
    final_states = torch.empty((num_final, heads, head_dim, state_size), **f32)
    tiles = cdiv(head_dim, block_p) * cdiv(state_size, block_n)
    ssd_chunked_scan_state_fwd_kernel[(batch, heads, tiles)](
        x, B, dt_out, cum, doc_ids, initial_states, states, final_states,
        *x.stride(), *B.stride(), *strides(initial_states, 4),
        seqlen, heads, head_dim, state_size, heads // groups, chunk_size, num_chunks,
        HAS_INITIAL=initial_states is not None, DOC_MODE=doc_mode, **dot_config(x.dtype),
        BLOCK_S=sizes["block_t"], BLOCK_P=block_p, BLOCK_N=block_n, **launch(LAUNCH["state"]),
    )
    return states, final_states


def chunk_scores(C, B, chunk_size: int):
    """C_t . B_s inside every chunk, for s <= t: [B, chunks, G, L, L] (above the diagonal: not written).

    Every head of a group reads the same scores, so they are computed once, not once per head. They are kept in
    the inputs' dtype (float32 accumulation, one rounding at the store): their readers multiply them into a tl.dot
    operand of that dtype, and every head reads them, so bf16 halves that traffic."""
    batch, seqlen, groups, state_size = B.shape
    num_chunks = cdiv(seqlen, chunk_size)
    sizes = block_sizes(chunk_size, 1, state_size)
    t_blocks = cdiv(chunk_size, sizes["block_t"])
    scores = torch.empty((batch, num_chunks, groups, chunk_size, chunk_size), device=B.device, dtype=C.dtype)
    ssd_chunked_scan_scores_fwd_kernel[(batch * num_chunks, groups, t_blocks * t_blocks)](
        C, B, scores, *C.stride(), *B.stride(), seqlen, state_size, chunk_size, num_chunks, t_blocks,
        **dot_config(C.dtype), BLOCK_T=sizes["block_t"], BLOCK_N=min(sizes["block_n"], 128),
        **launch(LAUNCH["scores"]),
    )
    return scores


def chunk_outputs(x, C, scores, D, z, dt_out, cum, doc_ids, doc_mode: int, chunk_size: int, states, dout=None):
    """Kernel 3: y [B, T, H, P] in x's dtype; with ``dout`` (and z), the gate's backward: (dy, dz)."""
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = C.shape[2], C.shape[3]
    num_chunks = cdiv(seqlen, chunk_size)
    sizes = block_sizes(chunk_size, head_dim, state_size)
    t_blocks = cdiv(chunk_size, sizes["block_t"])
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype) if dout is not None else None
    ssd_chunked_scan_output_fwd_kernel[(batch * num_chunks * t_blocks, heads, cdiv(head_dim, sizes["block_p"]))](
        x, C, scores, D, z, dt_out, cum, doc_ids, states, out, dout, dz,
        *x.stride(), *C.stride(), *strides(z, 4), *strides(dout, 4),
        seqlen, heads, head_dim, state_size, groups, chunk_size, num_chunks, t_blocks,
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        GATE_BACKWARD=dout is not None, DOC_MODE=doc_mode, **dot_config(x.dtype),
        BLOCK_T=sizes["block_t"], BLOCK_P=sizes["block_p"], BLOCK_N=sizes["block_n"], **launch(LAUNCH["output"]),
    )
    return (out, dz) if dout is not None else out


def ssd_chunked_scan_fwd(x, dt, A, B, C, chunk_size: int, D, z, dt_bias, dt_softplus: bool, dt_min: float,
                         dt_max: float, initial_states, doc_ids, doc_mode: int, num_final: int,
                         A_is_log: bool = False):
    """Launch the four kernels; shapes as ``ssm_hub.ops.ssd.ssd_chunked_scan``, documents as the module says.

    A, D, dt_bias and doc_ids must be contiguous. ``A_is_log``: A is Mamba-2's A_log, and the kernels use
    A = -exp(A_log) (which saves the model two launches forward and two backward). Returns (y [B, T, H, P] in x's dtype, final_states
    [num_final, H, P, N] float32, dt [B, H, chunks, L], a [B, H, chunks, L], states [B, chunks, H, P, N], scores
    [B, chunks, G, L, L]): the last four are the intermediates ``ssd_chunked_scan_bwd`` reads, kept rather than
    rebuilt (at the 130M Mamba-2's shape about 5% of the memory a layer keeps for backward, for three launches).
    """
    dt_out, cum = discretize_dt(dt, A, dt_bias, doc_ids, doc_mode, chunk_size, dt_softplus, dt_min, dt_max,
                                A_is_log)
    states, final_states = pass_states(x, B, dt_out, cum, doc_ids, doc_mode, chunk_size, initial_states, num_final)
    scores = chunk_scores(C, B, chunk_size)
    y = chunk_outputs(x, C, scores, D, z, dt_out, cum, doc_ids, doc_mode, chunk_size, states)
    return y, final_states, dt_out, cum, states, scores
