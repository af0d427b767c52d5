"""Triton kernel for a linear layer on one row (decoding one sequence: a matrix-vector product), for the two
projections of a SwiGLU feed-forward fused with its gate, ``silu(x W_gate^T + b_gate) * (x W_up^T + b_up)``, and for
a linear layer whose input is first normed by the gated, grouped RMSNorm (Mamba-2's ``out_proj(norm(y, z))``), and
for a linear layer followed by the causal conv1d's decode step on a range of its outputs (Mamba-2's in_proj and conv).

On one row the product is a pass over the weight: reading it is the whole cost. cuBLAS tiles the output in blocks
of 64 columns, so a 1024-column layer runs on 16 of an H100's 132 SMs and reads its weight at a third of the memory
bandwidth. Here one program owns 4 output columns, so that the programs fill the GPU, and loads their whole weight
rows at once (up to 4096 long), so that each program has its whole tile in flight. Products are
summed in float32, the bias added and the SwiGLU gate applied in float32, and the output rounded once.

With the norm, every program norms the whole input row itself (a few thousand values, read from L2) before its
columns: the norm needs no launch of its own, which on one row costs more than the norm. Its math and roundings are
those of ``ssm_hub.ops.gated_rms_norm``: n rounded to x's dtype, times the norm's weight, rounded again. The norm
may also add a residual first, as ``add_rms_norm`` does in a pre-norm block (the block's norm and Mamba-2's in_proj
in one launch); the first program writes the sum back.

With the conv step, the program that owns an output column that is also a conv channel runs that channel's step on
its rounded output (the window of the cached inputs and this one, the bias, SiLU) and shifts the channel's cached
window in place: each channel has exactly one owner, so no other program reads the window it rewrites. The math is
``ssm_hub.kernels.causal_conv1d_step``'s.
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

# The launch rule (see launch_config), chosen on an H100 by timing rules that varied the tile (4 to 64 columns),
# the step along K (512 to 4096) and the warps (2, 4, 8) on the projections of benchmarks/timing/gemv.py: on each
# shape the fastest had 4 columns a program and the whole row of K in one step, with 4 warps for rows up to 1024 long
# and 8 beyond.
BLOCK_N = 4
MAX_BLOCK_K = 4096


@triton.jit
def _gated_rms_norm_row(x_ptr, gate_ptr, norm_weight_ptr, residual_ptr, residual_out_ptr, in_features, eps,
                        HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, NORM_GROUPS: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gated RMSNorm of the row x [K] (K <= BLOCK_K) in float32, with ssm_hub.ops.gated_rms_norm's roundings;
    with a residual, the RMSNorm of residual + x with add_rms_norm's, the sum written to residual_out once."""
    k = tl.arange(0, BLOCK_K)
    k_mask = k < in_features
    x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # The sum goes back to the residual stream in its dtype; the norm sees it in x's dtype.
        residual = tl.load(residual_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        total = (x + residual).to(residual_out_ptr.dtype.element_ty)
        if tl.program_id(0) == 0:
            tl.store(residual_out_ptr + k, total, mask=k_mask)
        x = total.to(x_ptr.dtype.element_ty).to(tl.float32)
    h = x
    if HAS_GATE:
        z = tl.load(gate_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        silu = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            h = x * silu
    # One 1 / rms per group of K / G channels, spread back over the group's channels.
    group_size = in_features // NORM_GROUPS
    group = k // group_size
    rstd = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for g in tl.static_range(NORM_GROUPS):
        in_group = k_mask & (group == g)
        mean_square = tl.sum(tl.where(in_group, h * h, 0.0), axis=0) / group_size
        rstd = tl.where(in_group, tl.rsqrt(mean_square + eps), rstd)
    n = h * rstd
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            n = n * silu
    norm_weight = tl.load(norm_weight_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    normed = norm_weight * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    return normed.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _conv_step_epilogue(projected, n, n_mask, conv_state_ptr, conv_weight_ptr, conv_bias_ptr, conv_out_ptr,
                        conv_start, conv_channels, stride_state_c, stride_state_k, stride_conv_weight_c,
                        stride_conv_weight_k, CONV_WIDTH: tl.constexpr, CONV_HAS_BIAS: tl.constexpr,
                        CONV_SILU: tl.constexpr, BLOCK_W: tl.constexpr):
    """The conv step of the channels among the output columns n [BLOCK_N] (``projected``: their outputs, rounded as
    stored): writes each channel's output and shifts its cached window by this input, in place."""
    c = n - conv_start
    is_conv = n_mask & (c >= 0) & (c < conv_channels)
    tap = tl.arange(0, BLOCK_W)
    state = conv_state_ptr + c[:, None] * stride_state_c
    # 1. The window [BLOCK_N, K]: taps 0 .. K - 2 from the cache, tap K - 1 is this projection.
    cached = tl.load(state + tap[None, :] * stride_state_k, mask=is_conv[:, None] & (tap[None, :] < CONV_WIDTH - 1),
                     other=0.0).to(tl.float32)
    window = tl.where(tap[None, :] == CONV_WIDTH - 1, projected.to(tl.float32)[:, None], cached)
    # 2. y = act(bias + sum_k weight[:, k] * window[:, k]).
    weight = tl.load(conv_weight_ptr + c[:, None] * stride_conv_weight_c + tap[None, :] * stride_conv_weight_k,
                     mask=is_conv[:, None] & (tap[None, :] < CONV_WIDTH), other=0.0).to(tl.float32)
    y = tl.sum(window * weight, axis=1)
    if CONV_HAS_BIAS:
        y += tl.load(conv_bias_ptr + c, mask=is_conv, other=0.0).to(tl.float32)
    if CONV_SILU:
        y = y * tl.sigmoid(y)
    tl.store(conv_out_ptr + c, y.to(conv_out_ptr.dtype.element_ty), mask=is_conv)
    # 3. The new window: cached taps 1 .. K - 2, then this projection, in the cache's dtype. Entry k + 1 is read by
    #    the lane that writes entry k, so every lane reads before any writes.
    state_dtype = conv_state_ptr.dtype.element_ty
    shifted = tl.load(state + (tap[None, :] + 1) * stride_state_k,
                      mask=is_conv[:, None] & (tap[None, :] + 1 < CONV_WIDTH - 1), other=0.0)
    shifted = tl.where(tap[None, :] + 1 == CONV_WIDTH - 1, projected.to(state_dtype)[:, None],
                       shifted.to(state_dtype))
    tl.debug_barrier()
    tl.store(state + tap[None, :] * stride_state_k, shifted, mask=is_conv[:, None] & (tap[None, :] < CONV_WIDTH - 1))


@triton.jit
def gemv_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, up_weight_ptr, up_bias_ptr, out_ptr, gate_ptr, norm_weight_ptr, residual_ptr,
    residual_out_ptr, conv_state_ptr, conv_weight_ptr, conv_bias_ptr, conv_out_ptr,
    out_features, in_features, eps, conv_start, conv_channels,
    stride_state_c, stride_state_k, stride_conv_weight_c, stride_conv_weight_k,
    HAS_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr,
    HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, NORM_GROUPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CONV: tl.constexpr,
    CONV_WIDTH: tl.constexpr, CONV_HAS_BIAS: tl.constexpr, CONV_SILU: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = n < out_features
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        if NORM:  # the launcher guarantees one step: the whole row is one block
            x = _gated_rms_norm_row(x_ptr, gate_ptr, norm_weight_ptr, residual_ptr, residual_out_ptr, in_features,
                                    eps, HAS_GATE, NORM_BEFORE_GATE, NORM_GROUPS, HAS_RESIDUAL, BLOCK_K)
        else:
            x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        weight_offsets = n[:, None] * in_features + k[None, :]
        tile_mask = n_mask[:, None] & k_mask[None, :]
        weight = tl.load(weight_ptr + weight_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        acc += tl.sum(weight * x[None, :], axis=1)
        if SWIGLU:
            up_weight = tl.load(up_weight_ptr + weight_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            up_acc += tl.sum(up_weight * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_UP_BIAS:
        up_acc += tl.load(up_bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * up_acc
    projected = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n, projected, mask=n_mask)
    if CONV:
        _conv_step_epilogue(projected, n, n_mask, conv_state_ptr, conv_weight_ptr, conv_bias_ptr, conv_out_ptr,
                            conv_start, conv_channels, stride_state_c, stride_state_k, stride_conv_weight_c,
                            stride_conv_weight_k, CONV_WIDTH, CONV_HAS_BIAS, CONV_SILU, BLOCK_W)


def launch_config(in_features: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps): the row of K in one step up to MAX_BLOCK_K, then in steps of it."""
    block_k = max(16, min(next_power_of_2(in_features), MAX_BLOCK_K))
    return block_k, 4 if block_k <= 1024 else 8


def gemv_fwd(x, weight, bias, up_weight=None, up_bias=None, norm=None, conv=None, residual=None):
    """Launch the kernel: x [K] contiguous, weight (and up_weight) [N, K] and bias [N] contiguous.

    Returns x W^T + b [N], or with ``up_weight`` silu(x W^T + b) * (x W_up^T + b_up), in x's dtype. ``norm``:
    (gate [K] contiguous or None, norm weight [K] contiguous, n_groups, eps, norm_before_gate) to project the gated
    RMSNorm of x instead of x, for K <= MAX_BLOCK_K; its weight has x's dtype. ``residual`` [K] contiguous, with an
    ungated ``norm``: project the RMSNorm of residual + x (add_rms_norm's step, the sum rounded to the dtype promoted
    from x's and residual's) and also return that sum. ``conv``: (conv_state [C, K_conv - 1], conv weight
    [C, K_conv], conv bias [C] contiguous or None, start, silu) to also run the causal conv1d's decode step on
    outputs start .. start + C - 1 and shift conv_state in place, and also return the step's output [C] in x's
    dtype. The extra outputs follow the projection in that order: (projection, conv output, sum)."""
    out_features, in_features = weight.shape
    out = torch.empty(out_features, device=x.device, dtype=x.dtype)
    conv_state, conv_weight, conv_bias, conv_start, conv_silu = conv if conv is not None else (None,) * 4 + (False,)
    conv_channels, conv_width = conv_weight.shape if conv is not None else (0, 2)
    conv_out = torch.empty(conv_channels, device=x.device, dtype=x.dtype) if conv is not None else None
    residual_out = (torch.empty(in_features, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
                    if residual is not None else None)
    extras = [t for t in (conv_out, residual_out) if t is not None]
    if residual is not None and (norm is None or norm[0] is not None):
        raise ValueError("a residual goes with an ungated norm")
    if out_features == 0:
        if residual is not None:
            residual_out.copy_(x + residual)
        return (out, *extras) if extras else out
    block_k, num_warps = launch_config(in_features)
    gate, norm_weight, n_groups, eps, norm_before_gate = norm if norm is not None else (None, None, 1, 0.0, False)
    if norm is not None and in_features > block_k:
        raise ValueError(f"the normed projection takes rows of at most {MAX_BLOCK_K} channels, got {in_features}")
    state_strides = conv_state.stride() if conv is not None else (0, 0)
    conv_weight_strides = conv_weight.stride() if conv is not None else (0, 0)
    gemv_fwd_kernel[(cdiv(out_features, BLOCK_N),)](
        x, weight, bias, up_weight, up_bias, out, gate, norm_weight, residual, residual_out, conv_state, conv_weight,
        conv_bias, conv_out, out_features, in_features, eps, conv_start or 0, conv_channels, *state_strides,
        *conv_weight_strides,
        HAS_BIAS=bias is not None, HAS_UP_BIAS=up_bias is not None, SWIGLU=up_weight is not None,
        NORM=norm is not None, HAS_GATE=gate is not None, NORM_BEFORE_GATE=norm_before_gate, NORM_GROUPS=n_groups,
        HAS_RESIDUAL=residual is not None, CONV=conv is not None, CONV_WIDTH=conv_width,
        CONV_HAS_BIAS=conv_bias is not None, CONV_SILU=conv_silu, BLOCK_W=next_power_of_2(conv_width),
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=num_warps,
    )
    return (out, *extras) if extras else out
