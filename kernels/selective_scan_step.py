"""Triton kernel for one decoding step of the selective scan (Mamba-1): state update, output, D skip and z gate.

One program handles one (batch row, block of channels) and the whole state dimension: it reads its slice of the
state once and writes the new state once, so the step is memory-bound by design (the state is the only large
tensor). Accumulation is in float32; the state is read in its own dtype and written in float32.
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
def selective_scan_step_fwd_kernel(
    state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, state_indices_ptr,
    y_ptr, new_state_ptr,
    stride_state_row, stride_state_d, stride_state_n,
    stride_u_row, stride_u_d,
    stride_delta_row, stride_delta_d,
    stride_B_row, stride_B_n,
    stride_C_row, stride_C_n,
    stride_z_row, stride_z_d,
    stride_y_row, stride_y_d,
    stride_new_row, stride_new_d, stride_new_n,
    dim, state_size,
    A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    HAS_STATE_INDICES: tl.constexpr, NEW_STATE_AT_SLOT: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    d_mask = d < dim
    n_mask = n < state_size
    tile = d_mask[:, None] & n_mask[None, :]
    state_row = row
    if HAS_STATE_INDICES:
        state_row = tl.load(state_indices_ptr + row).to(tl.int64)

    # 1. Discretise delta for these channels: bias, softplus; the decay exp(dt * A) is [BLOCK_D, BLOCK_N].
    dt = tl.load(delta_ptr + row * stride_delta_row + d * stride_delta_d, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        dt += tl.load(delta_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if DELTA_SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + d[:, None] * state_size + n[None, :], mask=tile, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    decay = tl.exp(dt[:, None] * A)

    # 2. h = decay * h + (dt * u) outer B.
    u = tl.load(u_ptr + row * stride_u_row + d * stride_u_d, mask=d_mask, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + row * stride_B_row + n * stride_B_n, mask=n_mask, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + row * stride_C_row + n * stride_C_n, mask=n_mask, other=0.0).to(tl.float32)
    state_offsets = state_row * stride_state_row + d[:, None] * stride_state_d + n[None, :] * stride_state_n
    state = tl.load(state_ptr + state_offsets, mask=tile, other=0.0).to(tl.float32)
    state = state * decay + (dt * u)[:, None] * B[None, :]
    # In place, each element is read and written by the same lane, so no barrier is needed.
    new_row = state_row if NEW_STATE_AT_SLOT else row
    new_offsets = new_row * stride_new_row + d[:, None] * stride_new_d + n[None, :] * stride_new_n
    tl.store(new_state_ptr + new_offsets, state.to(new_state_ptr.dtype.element_ty), mask=tile)

    # 3. y = h . C + D u, gated by silu(z).
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z_row + d * stride_z_d, mask=d_mask, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + row * stride_y_row + d * stride_y_d, y.to(y_ptr.dtype.element_ty), mask=d_mask)


def selective_scan_step_fwd(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, state_indices,
                            A_is_log: bool = False, in_place: bool = False):
    """Launch the step kernel; shapes as ``ssm_hub.ops.selective_scan.selective_scan_step``; ``A``, ``D``,
    ``delta_bias`` and ``state_indices`` contiguous. Returns (y [B, D] in u's dtype, new_state [B, D, N] fp32), or
    with ``in_place`` (y, state) after writing each row's new state over its slot of ``state``."""
    batch, dim = u.shape
    state_size = A.shape[1]
    y = torch.empty_like(u)
    new_state = state if in_place else u.new_empty((batch, dim, state_size), dtype=torch.float32)
    block_n = next_power_of_2(state_size)
    # A program's state tile of at most 2K elements stays in registers and leaves enough programs for small batches.
    block_d = max(1, min(next_power_of_2(dim), 2048 // block_n))
    grid = (batch, cdiv(dim, block_d))
    selective_scan_step_fwd_kernel[grid](
        state, u, delta, A, B, C, D, z, delta_bias, state_indices, y, new_state,
        *state.stride(), *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *strides(z, 2), *y.stride(),
        *new_state.stride(),
        dim, state_size,
        A_IS_LOG=A_is_log, HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, HAS_STATE_INDICES=state_indices is not None, NEW_STATE_AT_SLOT=in_place,
        BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return y, new_state
