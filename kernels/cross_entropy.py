"""Triton kernels for the per-token cross-entropy of a language model's logits (``ssm_hub.ops.cross_entropy``):
forward and backward.

Each program takes one row (token) of logits [N, V] and walks its V columns in blocks, so the logits are read in
their own dtype (bfloat16 under autocast) and never copied to float32. The forward keeps a running maximum and sum
of exponentials (the online log-sum-exp) and stores, per row, lse = log sum_j exp(x_j) and the loss lse - x_target;
the backward reads the row once more and writes dx_j = g * (exp(x_j - lse) - [j == target]) in the logits' dtype,
where g is the row's upstream gradient. Rows whose target is ``ignore_index`` have loss 0 and gradient 0; a target
outside [0, V) gives a NaN loss (checking it on the host would stall the step). All arithmetic is in float32;
offsets are int64.
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
from ssm_hub.kernels.launch_sizes import next_power_of_2  # noqa: E402


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr, stride_row, vocab, ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    running_max = tl.full((), float("-inf"), dtype=tl.float32)
    running_sum = tl.full((), 0.0, dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(targets_ptr + row).to(tl.int64)
    in_range = (target >= 0) & (target < vocab)
    target_logit = tl.load(row_ptr + target, mask=in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - target_logit, float("nan"))
    loss = tl.where(target == ignore_index, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_logits_ptr, stride_row, stride_grad_row, vocab,
    ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_loss_ptr + row).to(tl.float32)
    grad = tl.where(target == ignore_index, 0.0, grad)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        probability = tl.exp(x - lse)
        dx = grad * (probability - tl.where(cols == target, 1.0, 0.0))
        tl.store(grad_row_ptr + cols, dx.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block_and_warps(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): up to 4096 columns a block, 8 a thread. Under Triton's CPU interpreter (the tests)
    blocks are small, so that the tests' small vocabularies still take several blocks a row."""
    if triton_interpreter_enabled():
        return min(32, next_power_of_2(vocab)), 1
    block = min(4096, next_power_of_2(vocab))
    return block, max(1, min(16, block // 256))


def cross_entropy_fwd(logits, targets, ignore_index: int):
    """Launch the forward: logits [N, V] with stride 1 along V, targets [N] integer.

    Returns (loss [N] float32, lse [N] float32)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows > 0:
        block, num_warps = _block_and_warps(vocab)
        cross_entropy_fwd_kernel[(rows,)](
            logits, targets, loss, lse, logits.stride(0), vocab, ignore_index, BLOCK_V=block, num_warps=num_warps,
        )
    return loss, lse


def cross_entropy_bwd(grad_loss, logits, targets, lse, ignore_index: int):
    """Launch the backward: grad_loss [N] (any float dtype), the forward's logits, targets and lse.

    Returns grad_logits [N, V] in the logits' dtype."""
    rows, vocab = logits.shape
    grad_logits = torch.empty((rows, vocab), device=logits.device, dtype=logits.dtype)
    if rows > 0:
        block, num_warps = _block_and_warps(vocab)
        cross_entropy_bwd_kernel[(rows,)](
            logits, targets, lse, grad_loss, grad_logits, logits.stride(0), grad_logits.stride(0), vocab,
            ignore_index, BLOCK_V=block, num_warps=num_warps,
        )
    return grad_logits
