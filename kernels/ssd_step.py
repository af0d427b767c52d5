"""Triton kernel for one decoding step of the SSD (Mamba-2) recurrence: state update, output, D skip and z gate.

One program handles one (batch row, head, block of head_dim) and the whole state dimension: it reads its slice of
the state once and writes the new state once, which makes the step memory-bound by design (the state is the only
large tensor). Accumulation is in float32; the state is read in its own dtype and written in float32.
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
from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2, strides  # noqa: E402



@triton.jit
def ssd_step_fwd_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, state_indices_ptr,
    y_ptr, new_state_ptr,
    stride_state_row, stride_state_head, stride_state_p, stride_state_n,
    stride_x_row, stride_x_head, stride_x_p,
    stride_dt_row, stride_dt_head,
    stride_B_row, stride_B_group, stride_B_n,
    stride_C_row, stride_C_group, stride_C_n,
    stride_z_row, stride_z_head, stride_z_p,
    stride_y_row, stride_y_head, stride_y_p,
    stride_new_row, stride_new_head, stride_new_p, stride_new_n,
    head_dim, state_size, heads_per_group, dt_min, dt_max,
    A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_STATE_INDICES: tl.constexpr,
    NEW_STATE_AT_SLOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < head_dim
    n_mask = n < state_size
    group = head // heads_per_group
    state_row = row
    if HAS_STATE_INDICES:
        state_row = tl.load(state_indices_ptr + row).to(tl.int64)

    # 1. Discretise dt for this (row, head): bias, softplus, clamp to dt_limit.
    dt = tl.load(dt_ptr + row * stride_dt_row + head * stride_dt_head).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + head).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    A = tl.load(A_ptr + head).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    decay = tl.exp(dt * A)

    # 2. h = decay * h + dt * x outer B.
    x = tl.load(x_ptr + row * stride_x_row + head * stride_x_head + p * stride_x_p, mask=p_mask, other=0.0)
    x = x.to(tl.float32)
    B = tl.load(B_ptr + row * stride_B_row + group * stride_B_group + n * stride_B_n, mask=n_mask, other=0.0)
    C = tl.load(C_ptr + row * stride_C_row + group * stride_C_group + n * stride_C_n, mask=n_mask, other=0.0)
    tile = p_mask[:, None] & n_mask[None, :]
    state_offsets = (state_row * stride_state_row + head * stride_state_head
                     + p[:, None] * stride_state_p + n[None, :] * stride_state_n)
    state = tl.load(state_ptr + state_offsets, mask=tile, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * B.to(tl.float32)[None, :]
    # In place, each element is read and written by the same lane, so no barrier is needed.
    new_row = state_row if NEW_STATE_AT_SLOT else row
    new_offsets = (new_row * stride_new_row + head * stride_new_head
                   + p[:, None] * stride_new_p + n[None, :] * stride_new_n)
    tl.store(new_state_ptr + new_offsets, state.to(new_state_ptr.dtype.element_ty), mask=tile)

    # 3. y = h C + D x, gated by silu(z).
    y = tl.sum(state * C.to(tl.float32)[None, :], axis=1)
    if HAS_D:
        if D_HAS_HDIM:
            y += tl.load(D_ptr + head * head_dim + p, mask=p_mask, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + head).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z_row + head * stride_z_head + p * stride_z_p, mask=p_mask, other=0.0)
        z = z.to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + row * stride_y_row + head * stride_y_head + p * stride_y_p, y.to(y_ptr.dtype.element_ty),
             mask=p_mask)


def ssd_step_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool, dt_min: float, dt_max: float,
                 state_indices, A_is_log: bool = False, in_place: bool = False):
    """Launch the step kernel; shapes as ``ssm_hub.ops.ssd.ssd_step``. Returns (y [B, H, P], new_state fp32), or
    with ``in_place`` (y, state) after writing each row's new state over its slot of ``state``."""
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1], B.shape[2]
    y = torch.empty_like(x)
    new_state = state if in_place else x.new_empty((batch, heads, head_dim, state_size), dtype=torch.float32)
    block_n = next_power_of_2(state_size)
    # Keep a program's state tile near 4K elements so it stays in registers.
    block_p = max(1, min(next_power_of_2(head_dim), 4096 // block_n))
    grid = (batch, heads, cdiv(head_dim, block_p))
    ssd_step_fwd_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, state_indices, y, new_state,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *strides(z, 3), *y.stride(),
        *new_state.stride(),
        head_dim, state_size, heads // groups, dt_min, dt_max,
        A_IS_LOG=A_is_log, HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_STATE_INDICES=state_indices is not None,
        NEW_STATE_AT_SLOT=in_place, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return y, new_state
