"""Mamba-2's sequence path for training on the kernels, as one autograd node: causal conv1d + SiLU -> chunked SSD
scan -> gated RMSNorm -> (optionally) out_proj.

    from ssm_hub.ops.mamba2_sequence import Mamba2Sizes, mamba2_sequence_on_kernels, mamba2_sequence_train
    if mamba2_sequence_on_kernels(hidden_states, sizes):
        out = mamba2_sequence_train(xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight,
                                    out_weight, out_bias, padding_mask, seq_idx, sizes)

It is made of the custom ops of ssm_hub.ops (causal_conv1d, ssd, gated_rms_norm) and adds no math of its own; what it
changes is what a training step keeps for backward. Besides its inputs (slices of in_proj's output, which stays alive
anyway) it keeps the conv output (the scan's x, B and C), the scan's output and intermediates (per-chunk states and
scores) and the normed output (out_proj's input), and rebuilds nothing in backward. At 130M that is 3.5 + 3 + 2.2 + 3
KB a token a layer. An earlier version kept only the scan's output and rebuilt the rest in backward: 8.7 KB a token a
layer less, for five more launches a layer, and a step of this size is bound by the host's launch rate, not by the GPU
(benchmarks/profiles/profile_training_host.py); the memory stays well under a same-size transformer's. mamba_ssm's
fused path keeps in_proj's output and the scan's output. This node replaces selective activation checkpointing, whose
Python dispatch mode ran on every op of the step.

Training only: no cache and no initial or final states. out_weight None leaves out_proj to the caller (for example
when a PEFT adapter wraps it) and returns the normed output.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssm_hub.backend import resolve_backend
from ssm_hub.ops.causal_conv1d.custom_ops import causal_conv1d_bwd_triton, causal_conv1d_fwd_triton
from ssm_hub.ops.gated_rms_norm.custom_ops import MAX_GROUP_SIZE, gated_rms_norm_bwd_op, gated_rms_norm_fwd_op
from ssm_hub.ops.ssd import scan_documents
from ssm_hub.ops.ssd.custom_ops import ssd_chunked_scan_bwd_triton, ssd_chunked_scan_fwd_triton


class Mamba2Sizes(NamedTuple):
    """The mixer's shapes and options that are not tensors."""

    intermediate_size: int
    n_groups: int
    state_size: int
    num_heads: int
    head_dim: int
    chunk_size: int
    dt_limit: tuple[float, float]
    norm_groups: int
    norm_eps: float
    norm_before_gate: bool
    out_dtype: torch.dtype


def mamba2_sequence_on_kernels(hidden_states: torch.Tensor, sizes: Mamba2Sizes) -> bool:
    """Whether :func:`mamba2_sequence_train` serves a training call on ``hidden_states``' device: the conv, the scan
    and the gated norm each resolve to their kernel (see ssm_hub.backend), the norm's groups within the kernel's
    ``MAX_GROUP_SIZE``."""
    norm_fits = sizes.intermediate_size // sizes.norm_groups <= MAX_GROUP_SIZE
    ops = (("causal_conv1d", True), ("ssd_chunked_scan", True), ("gated_rms_norm", norm_fits))
    return all(resolve_backend(op, "auto", hidden_states, has_triton_kernel=supported) == "triton"
               for op, supported in ops)


def mamba2_sequence_train(xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, out_weight, out_bias,
                          padding_mask, seq_idx, sizes: Mamba2Sizes) -> torch.Tensor:
    """xBC [B, T, conv_dim] (before the conv), dt [B, T, H], gate [B, T, d_inner] -> out_proj(norm(scan(conv(xBC))))
    [B, T, hidden], or the normed output [B, T, d_inner] in ``sizes.out_dtype`` when out_weight is None.
    ``A_log`` [H]: the scan's A is -exp(A_log), computed in its kernels. ``padding_mask`` [B, T] zeroes the conv
    output of padding tokens; ``seq_idx`` [B, T] marks packed documents."""
    doc_ids, doc_mode = scan_documents(xBC.shape[0], xBC.shape[1], seq_idx, xBC.device)
    return _Mamba2Sequence.apply(xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, out_weight,
                                 out_bias, padding_mask, seq_idx, doc_ids, doc_mode, sizes)


def _conv(xBC, conv_weight, conv_bias, padding_mask, seq_idx):
    """The conv output [B, T, conv_dim], padding tokens zeroed."""
    conv_out, _ = causal_conv1d_fwd_triton(xBC, conv_weight, conv_bias, None, seq_idx, None, True)
    if padding_mask is not None:
        conv_out = conv_out * padding_mask[..., None].to(conv_out.dtype)
    return conv_out


def _split_conv_out(conv_out, sizes: Mamba2Sizes):
    """(x [B, T, H, P], B [B, T, G, N], C [B, T, G, N]): views of the conv output."""
    batch, seqlen, _ = conv_out.shape
    groups = sizes.n_groups * sizes.state_size
    x, B, C = conv_out.split([sizes.intermediate_size, groups, groups], dim=-1)
    return (x.view(batch, seqlen, sizes.num_heads, sizes.head_dim),
            B.view(batch, seqlen, sizes.n_groups, sizes.state_size),
            C.view(batch, seqlen, sizes.n_groups, sizes.state_size))


def _normed_dtype(out_weight, device_type: str, sizes: Mamba2Sizes) -> torch.dtype:
    """The dtype the normed output is written in: out_proj's compute dtype under autocast (the kernel rounds to it
    once, as autocast's cast would, and a float32 copy is neither written nor read), else ``sizes.out_dtype``."""
    if (out_weight is not None and torch.is_autocast_enabled(device_type)
            and out_weight.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return torch.get_autocast_dtype(device_type)
    return sizes.out_dtype


def _norm(y, norm_weight, gate, sizes: Mamba2Sizes, dtype: torch.dtype):
    """(normed [B, T, d_inner] in ``dtype``, rstd)."""
    batch, seqlen = y.shape[:2]
    return gated_rms_norm_fwd_op(
        y.view(batch, seqlen, sizes.intermediate_size), norm_weight, gate, sizes.norm_groups, sizes.norm_eps,
        sizes.norm_before_gate, dtype,
    )


class _Mamba2Sequence(torch.autograd.Function):
    # custom_fwd / custom_bwd: backward runs under the autocast state of forward, so out_proj's gradient matmuls use
    # the same dtypes as the forward one.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, out_weight, out_bias,
                padding_mask, seq_idx, doc_ids, doc_mode, sizes):
        conv_out = _conv(xBC, conv_weight, conv_bias, padding_mask, seq_idx)
        x, B, C = _split_conv_out(conv_out, sizes)
        low, high = sizes.dt_limit
        y, _, *scan_intermediates = ssd_chunked_scan_fwd_triton(
            x, dt, A_log, B, C, sizes.chunk_size, D, None, dt_bias, True, float(low), float(high), None, doc_ids,
            doc_mode, xBC.shape[0], True,
        )
        normed, rstd = _norm(y, norm_weight, gate, sizes, _normed_dtype(out_weight, xBC.device.type, sizes))
        ctx.save_for_backward(xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, out_weight,
                              out_bias, padding_mask, seq_idx, doc_ids, conv_out, y, rstd,
                              normed if out_weight is not None else None, *scan_intermediates)
        ctx.doc_mode, ctx.sizes = doc_mode, sizes
        return normed if out_weight is None else F.linear(normed, out_weight, out_bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out):
        (xBC, dt, gate, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, out_weight, out_bias, padding_mask,
         seq_idx, doc_ids, conv_out, y, rstd, normed, *scan_intermediates) = ctx.saved_tensors
        sizes = ctx.sizes
        needs = ctx.needs_input_grad
        d_out_weight = d_out_bias = None
        if out_weight is None:
            d_normed = d_out
        else:
            d_normed = d_out @ out_weight.to(d_out.dtype)
            if needs[9]:
                d_out_weight = (d_out.flatten(0, -2).T @ normed.flatten(0, -2).to(d_out.dtype)).to(out_weight.dtype)
            if out_bias is not None and needs[10]:
                d_out_bias = d_out.flatten(0, -2).sum(0).to(out_bias.dtype)
        batch, seqlen = y.shape[:2]
        dy, d_gate, d_norm_weight = gated_rms_norm_bwd_op(
            d_normed, y.view(batch, seqlen, sizes.intermediate_size), norm_weight, gate, rstd, sizes.norm_groups,
            sizes.norm_before_gate,
        )
        x, B, C = _split_conv_out(conv_out, sizes)
        low, high = sizes.dt_limit
        # packed_xBC: dx, dB and dC come back as one tensor laid out as the conv output, its gradient.
        d_conv_out, d_dt, dA_log, _, _, dD, _, d_dt_bias, _ = ssd_chunked_scan_bwd_triton(
            dy.view_as(x), None, x, dt, A_log, B, C, sizes.chunk_size, D, None, dt_bias, True, float(low),
            float(high), None, doc_ids, ctx.doc_mode, batch, *scan_intermediates, True, True,
        )
        if padding_mask is not None:
            d_conv_out = d_conv_out * padding_mask[..., None].to(d_conv_out.dtype)
        d_xBC, d_conv_weight, d_conv_bias, _ = causal_conv1d_bwd_triton(
            xBC, conv_weight, conv_bias, None, seq_idx, None, True, d_conv_out, None
        )
        return (d_xBC, d_dt, d_gate, d_conv_weight, d_conv_bias if conv_bias is not None else None, dA_log,
                dD if D is not None else None, d_dt_bias if dt_bias is not None else None, d_norm_weight,
                d_out_weight, d_out_bias, None, None, None, None, None)
