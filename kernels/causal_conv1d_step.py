"""Triton kernel for one decoding step of the causal depthwise conv1d: the window, its dot with the kernel, the
bias, SiLU, and the window shifted by this token.

One program handles one (batch row, block of channels) and all K taps. The window of a channel is its K - 1 cached
inputs (oldest first) followed by this token's input; the new conv state is the window without its oldest entry.
Taps are summed in float32. The cached inputs are copied to the new state in their own dtype, so they pass through
unchanged; this token's input is converted to the state's dtype.
"""

import torch

# Imported inside try: transformers' trust_remote_code check then does not demand triton from a checkpoint's
# users on CPU-only machines, where ssm_hub.backend never dispatches to these kernels.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("ssm_hub's Triton kernels need triton: pip install triton") from error

from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2  # noqa: E402  (after the guarded triton import)


@triton.jit
def causal_conv1d_step_fwd_kernel(
    x_ptr, conv_state_ptr, weight_ptr, bias_ptr, state_indices_ptr,
    y_ptr, new_state_ptr,
    stride_x_row, stride_x_c,
    stride_state_row, stride_state_c, stride_state_k,
    stride_weight_c, stride_weight_k,
    stride_y_row, stride_y_c,
    stride_new_row, stride_new_c, stride_new_k,
    channels,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_STATE_INDICES: tl.constexpr,
    NEW_STATE_AT_SLOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    c_mask = c < channels
    state_row = row
    if HAS_STATE_INDICES:
        state_row = tl.load(state_indices_ptr + row).to(tl.int64)
    state_base = conv_state_ptr + state_row * stride_state_row + c[:, None] * stride_state_c
    x = tl.load(x_ptr + row * stride_x_row + c * stride_x_c, mask=c_mask, other=0.0)

    # 1. The window [BLOCK_C, K]: taps 0 .. K - 2 from the state, tap K - 1 is this token.
    from_state = c_mask[:, None] & (k[None, :] < WIDTH - 1)
    cached = tl.load(state_base + k[None, :] * stride_state_k, mask=from_state, other=0.0).to(tl.float32)
    window = tl.where(k[None, :] == WIDTH - 1, x.to(tl.float32)[:, None], cached)

    # 2. y = act(bias + sum_k weight[:, k] * window[:, k]).
    taps = c_mask[:, None] & (k[None, :] < WIDTH)
    weight = tl.load(weight_ptr + c[:, None] * stride_weight_c + k[None, :] * stride_weight_k, mask=taps, other=0.0)
    y = tl.sum(window * weight.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + row * stride_y_row + c * stride_y_c, y.to(y_ptr.dtype.element_ty), mask=c_mask)

    # 3. New state entry j is window entry j + 1: read again from the state shifted by one, in the state's dtype.
    state_dtype = new_state_ptr.dtype.element_ty
    shifted = tl.load(state_base + (k[None, :] + 1) * stride_state_k,
                      mask=c_mask[:, None] & (k[None, :] + 1 < WIDTH - 1), other=0.0)
    shifted = tl.where(k[None, :] + 1 == WIDTH - 1, x.to(state_dtype)[:, None], shifted.to(state_dtype))
    new_row = row
    if NEW_STATE_AT_SLOT:
        # In place, entry k + 1 is read by the lane that writes entry k: every lane must have read before any writes.
        tl.debug_barrier()
        new_row = state_row
    new_offsets = new_row * stride_new_row + c[:, None] * stride_new_c + k[None, :] * stride_new_k
    tl.store(new_state_ptr + new_offsets, shifted, mask=c_mask[:, None] & (k[None, :] < WIDTH - 1))


def causal_conv1d_step_fwd(x, conv_state, weight, bias, silu: bool, state_indices, in_place: bool = False):
    """Launch the step kernel; shapes as ``ssm_hub.ops.causal_conv1d.causal_conv1d_step``; ``bias`` and
    ``state_indices`` contiguous. Returns (y [B, C] in x's dtype, new_conv_state [B, C, K - 1] in conv_state's
    dtype), or with ``in_place`` (y, conv_state) after writing each row's new window over its slot."""
    batch, channels = x.shape
    width = weight.shape[1]
    y = torch.empty_like(x)
    new_state = conv_state if in_place else x.new_empty((batch, channels, width - 1), dtype=conv_state.dtype)
    block_k = next_power_of_2(width)
    block_c = max(1, min(next_power_of_2(channels), 1024 // block_k))
    grid = (batch, cdiv(channels, block_c))
    causal_conv1d_step_fwd_kernel[grid](
        x, conv_state, weight, bias, state_indices, y, new_state,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(), *new_state.stride(),
        channels,
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, HAS_STATE_INDICES=state_indices is not None,
        NEW_STATE_AT_SLOT=in_place, BLOCK_C=block_c, BLOCK_K=block_k,
    )
    return y, new_state
