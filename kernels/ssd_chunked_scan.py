"""Triton kernels for the forward pass of the chunked SSD scan (Mamba-2), without varlen.

The algorithm is ``_ssd_chunks`` of ``ssm_hub.ops.ssd.reference``, in four kernels over chunks of L tokens:

1. ``ssd_chunked_scan_dt_fwd_kernel``, per (row, chunk, head): the discretised dt and the cumulative log decay
   a_t = sum_{u <= t} dt_u A from the chunk's start.
2. ``ssd_chunked_scan_chunk_state_fwd_kernel``, per (row, chunk, head, block of P): what the chunk adds to the
   state after it, sum_s exp(a_L - a_s) dt_s x_s ⊗ B_s, [P, N] in float32.
3. ``ssd_chunked_scan_state_passing_fwd_kernel``, per (row, head, block of P): the sequential pass over chunks from
   the initial state; it overwrites each chunk's contribution with the state entering that chunk and writes the
   final state.
4. ``ssd_chunked_scan_output_fwd_kernel``, per (row, chunk, block of tokens, head, block of P):
   y_t = sum_{s <= t} exp(a_t - a_s) (C_t . B_s) dt_s x_s + exp(a_t) C_t . h_in + D x_t, gated by silu(z_t).

Kernels 2 and 4 walk a chunk in blocks of at most ``MAX_BLOCK_L`` tokens, so that a chunk of 256 (Mamba-2's
default) needs [64, 64] score tiles rather than [256, 256].

Tokens past T in the last chunk are read as dt = x = B = C = 0: they decay nothing and add nothing, so the state
after the last chunk is the final state. Exponents are masked before exp (s > t, where a_t - a_s > 0, becomes
-inf), so every exponent is <= 0. Accumulation and the intermediates are float32; tl.dot operands are padded to
at least 16 in every dimension.
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

# The most tokens of a chunk that one tile of kernels 2 and 4 holds: [64, 64] score blocks, not [L, L].
MAX_BLOCK_L = 64


@triton.jit
def ssd_chunked_scan_dt_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cum_ptr,
    stride_dt_row, stride_dt_t, stride_dt_head,
    seqlen, heads, chunk_size, num_chunks, dt_min, dt_max,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    l = tl.arange(0, BLOCK_L)
    t = chunk * chunk_size + l
    valid = (l < chunk_size) & (t < seqlen)

    dt = tl.load(dt_ptr + row * stride_dt_row + t * stride_dt_t + head * stride_dt_head, mask=valid, other=0.0)
    dt = dt.to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + head).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    # Tokens past the sequence (or past the chunk in the padded block) neither decay nor add anything.
    dt = tl.where(valid, dt, 0.0)
    cum = tl.cumsum(dt * tl.load(A_ptr + head).to(tl.float32), axis=0)

    # Both [B, H, chunks, L], float32.
    offsets = ((row * heads + head) * num_chunks + chunk) * chunk_size + l
    tl.store(dt_out_ptr + offsets, dt, mask=l < chunk_size)
    tl.store(cum_ptr + offsets, cum, mask=l < chunk_size)


@triton.jit
def ssd_chunked_scan_chunk_state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, cum_ptr, states_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    seqlen, heads, head_dim, state_size, heads_per_group, chunk_size, num_chunks,
    DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_chunk = tl.program_id(0).to(tl.int64)
    row = row_chunk // num_chunks
    chunk = row_chunk % num_chunks
    head = tl.program_id(1).to(tl.int64)
    group = head // heads_per_group
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size

    chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
    cum_end = tl.load(cum_ptr + chunk_offset + chunk_size - 1)
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s_start in range(0, chunk_size, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        t = chunk * chunk_size + s
        s_valid = (s < chunk_size) & (t < seqlen)
        dt = tl.load(dt_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        cum = tl.load(cum_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        # a_L - a_s <= 0 for tokens of the chunk; the padded ones have weight 0 through dt anyway.
        weight = tl.exp(tl.minimum(cum_end - cum, 0.0)) * dt

        # x^T as [P, S] and B as [S, N]: the contribution is (x^T * weight) @ B.
        xt = tl.load(
            x_ptr + row * stride_x_row + t[None, :] * stride_x_t + head * stride_x_head + p[:, None] * stride_x_p,
            mask=p_mask[:, None] & s_valid[None, :], other=0.0,
        ).to(tl.float32)
        Bs = tl.load(
            B_ptr + row * stride_B_row + t[:, None] * stride_B_t + group * stride_B_group + n[None, :] * stride_B_n,
            mask=s_valid[:, None] & n_mask[None, :], other=0.0,
        ).to(tl.float32)
        state += tl.dot(xt * weight[None, :], Bs, input_precision=DOT_PRECISION)

    # [B, chunks, H, P, N], float32.
    out = states_ptr + ((row_chunk * heads + head) * head_dim + p[:, None]) * state_size + n[None, :]
    tl.store(out, state, mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def ssd_chunked_scan_state_passing_fwd_kernel(
    states_ptr, cum_ptr, initial_ptr, final_ptr,
    stride_init_row, stride_init_head, stride_init_p, stride_init_n,
    heads, head_dim, state_size, chunk_size, num_chunks,
    HAS_INITIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tile = (p[:, None] < head_dim) & (n[None, :] < state_size)

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_INITIAL:
        state = tl.load(
            initial_ptr + row * stride_init_row + head * stride_init_head + p[:, None] * stride_init_p
            + n[None, :] * stride_init_n, mask=tile, other=0.0,
        ).to(tl.float32)
    tile_offsets = p[:, None] * state_size + n[None, :]
    for chunk in range(num_chunks):
        offsets = ((row * num_chunks + chunk) * heads + head) * head_dim * state_size + tile_offsets
        contribution = tl.load(states_ptr + offsets, mask=tile, other=0.0)
        # The program owns this tile of every chunk: it may replace the contribution by the entering state.
        tl.store(states_ptr + offsets, state, mask=tile)
        cum_end = tl.load(cum_ptr + ((row * heads + head) * num_chunks + chunk) * chunk_size + chunk_size - 1)
        state = tl.exp(tl.minimum(cum_end, 0.0)) * state + contribution
    final = ((row * heads + head) * head_dim + p[:, None]) * state_size + n[None, :]
    tl.store(final_ptr + final, state, mask=tile)


@triton.jit
def ssd_chunked_scan_output_fwd_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_ptr, cum_ptr, states_ptr, y_ptr,
    stride_x_row, stride_x_t, stride_x_head, stride_x_p,
    stride_B_row, stride_B_t, stride_B_group, stride_B_n,
    stride_C_row, stride_C_t, stride_C_group, stride_C_n,
    stride_z_row, stride_z_t, stride_z_head, stride_z_p,
    stride_y_row, stride_y_t, stride_y_head, stride_y_p,
    seqlen, heads, head_dim, state_size, heads_per_group, chunk_size, num_chunks, t_blocks,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_T tokens of one chunk (t counted from the chunk's start), one head, BLOCK_P channels.
    program = tl.program_id(0).to(tl.int64)
    row_chunk = program // t_blocks
    row = row_chunk // num_chunks
    chunk = row_chunk % num_chunks
    t_start = (program % t_blocks) * BLOCK_T
    head = tl.program_id(1).to(tl.int64)
    group = head // heads_per_group
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    l = t_start + tl.arange(0, BLOCK_T)
    t = chunk * chunk_size + l
    t_valid = (l < chunk_size) & (t < seqlen)
    p_mask = p < head_dim
    n_mask = n < state_size

    chunk_offset = ((row * heads + head) * num_chunks + chunk) * chunk_size
    cum = tl.load(cum_ptr + chunk_offset + l, mask=l < chunk_size, other=0.0)
    Ct = tl.load(
        C_ptr + row * stride_C_row + t[:, None] * stride_C_t + group * stride_C_group + n[None, :] * stride_C_n,
        mask=t_valid[:, None] & n_mask[None, :], other=0.0,
    ).to(tl.float32)

    # 1. The state entering the chunk, read as [N, P]: exp(a_t) C_t . h_in.
    entering = tl.load(
        states_ptr + ((row_chunk * heads + head) * head_dim + p[None, :]) * state_size + n[:, None],
        mask=n_mask[:, None] & p_mask[None, :], other=0.0,
    )
    y = tl.dot(Ct, entering, input_precision=DOT_PRECISION) * tl.exp(tl.minimum(cum, 0.0))[:, None]

    # 2. Inside the chunk, over the tokens s <= t: decay from s to t, masked to s <= t before exp so that every
    #    exponent is <= 0, times (C_t . B_s) dt_s x_s.
    s_end = tl.minimum(t_start + BLOCK_T, chunk_size)
    for s_start in range(0, s_end, BLOCK_T):
        s = s_start + tl.arange(0, BLOCK_T)
        ts = chunk * chunk_size + s
        s_valid = (s < chunk_size) & (ts < seqlen)
        dt_s = tl.load(dt_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        cum_s = tl.load(cum_ptr + chunk_offset + s, mask=s < chunk_size, other=0.0)
        # B^T as [N, S], so that C @ B^T is the [T, S] block of C_t . B_s.
        Bt = tl.load(
            B_ptr + row * stride_B_row + ts[None, :] * stride_B_t + group * stride_B_group + n[:, None] * stride_B_n,
            mask=n_mask[:, None] & s_valid[None, :], other=0.0,
        ).to(tl.float32)
        x_s = tl.load(
            x_ptr + row * stride_x_row + ts[:, None] * stride_x_t + head * stride_x_head + p[None, :] * stride_x_p,
            mask=s_valid[:, None] & p_mask[None, :], other=0.0,
        ).to(tl.float32)
        causal = (l[:, None] >= s[None, :]) & (l[:, None] < chunk_size) & (s[None, :] < chunk_size)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum_s[None, :], float("-inf")))
        scores = tl.dot(Ct, Bt, input_precision=DOT_PRECISION) * decay * dt_s[None, :]
        y += tl.dot(scores, x_s, input_precision=DOT_PRECISION)

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
    if HAS_Z:
        z = tl.load(
            z_ptr + row * stride_z_row + t[:, None] * stride_z_t + head * stride_z_head + p[None, :] * stride_z_p,
            mask=tile, other=0.0,
        ).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(
        y_ptr + row * stride_y_row + t[:, None] * stride_y_t + head * stride_y_head + p[None, :] * stride_y_p,
        y.to(y_ptr.dtype.element_ty), mask=tile,
    )


def ssd_chunked_scan_fwd(x, dt, A, B, C, chunk_size: int, D, z, dt_bias, dt_softplus: bool, dt_min: float,
                         dt_max: float, initial_states):
    """Launch the four kernels; shapes as ``ssm_hub.ops.ssd.ssd_chunked_scan`` (no varlen).

    A, D and dt_bias must be contiguous. Returns (y [B, T, H, P] in x's dtype, final_states [B, H, P, N] float32).
    """
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    num_chunks = triton.cdiv(seqlen, chunk_size)
    device = x.device
    f32 = dict(device=device, dtype=torch.float32)

    dt_out = torch.empty((batch, heads, num_chunks, chunk_size), **f32)
    cum = torch.empty((batch, heads, num_chunks, chunk_size), **f32)
    states = torch.empty((batch, num_chunks, heads, head_dim, state_size), **f32)
    final_states = torch.empty((batch, heads, head_dim, state_size), **f32)
    y = torch.empty_like(x)

    # Chunks longer than MAX_BLOCK_L are walked in blocks of that many tokens; tl.dot needs every dim >= 16.
    block_l = max(16, triton.next_power_of_2(chunk_size))
    block_t = min(block_l, MAX_BLOCK_L)
    t_blocks = triton.cdiv(chunk_size, block_t)
    block_n = max(16, triton.next_power_of_2(state_size))
    block_p = max(16, min(64, triton.next_power_of_2(head_dim)))
    p_blocks = triton.cdiv(head_dim, block_p)
    # fp32 inputs keep fp32 products (tf32 would lose ~3 digits); lower precision inputs lose nothing to tf32.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    ssd_chunked_scan_dt_fwd_kernel[(batch, num_chunks, heads)](
        dt, A, dt_bias, dt_out, cum, *dt.stride(),
        seqlen, heads, chunk_size, num_chunks, dt_min, dt_max,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, BLOCK_L=block_l,
    )
    ssd_chunked_scan_chunk_state_fwd_kernel[(batch * num_chunks, heads, p_blocks)](
        x, B, dt_out, cum, states, *x.stride(), *B.stride(),
        seqlen, heads, head_dim, state_size, heads // groups, chunk_size, num_chunks,
        DOT_PRECISION=precision, BLOCK_S=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    init_strides = initial_states.stride() if initial_states is not None else (0, 0, 0, 0)
    ssd_chunked_scan_state_passing_fwd_kernel[(batch, heads, p_blocks)](
        states, cum, initial_states, final_states, *init_strides,
        heads, head_dim, state_size, chunk_size, num_chunks,
        HAS_INITIAL=initial_states is not None, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    ssd_chunked_scan_output_fwd_kernel[(batch * num_chunks * t_blocks, heads, p_blocks)](
        x, B, C, D, z, dt_out, cum, states, y,
        *x.stride(), *B.stride(), *C.stride(), *z_strides, *y.stride(),
        seqlen, heads, head_dim, state_size, heads // groups, chunk_size, num_chunks, t_blocks,
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        DOT_PRECISION=precision, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return y, final_states
