"""The cross-entropy kernels against the reference (torch's cross_entropy on float32 logits): per-token losses and
the logits' gradient, fp32 and bf16 logits, vocabularies that span several blocks, ignored targets, strided rows; a
target out of range gives NaN; input errors name the argument."""

import pytest
import torch
import torch.nn.functional as F

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.cross_entropy import cross_entropy, cross_entropy_ref

pytestmark = requires_triton


def _loss_and_grad(logits, targets, grad_loss, backend, ignore_index=-100):
    leaf = logits.detach().requires_grad_(True)
    loss = cross_entropy(leaf, targets, ignore_index, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf, grad_loss)
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 64, 100])
def test_kernels_match_the_reference(dtype, vocab):
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, vocab, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, vocab, (3, 9), device=DEVICE)
    targets[0, :4] = -100
    grad_loss = torch.rand(3, 9, device=DEVICE)
    loss, grad = _loss_and_grad(logits, targets, grad_loss, "triton")
    # The reference on the same (rounded) values in float32: the kernels compute in float32 and round the gradient
    # once at its store.
    loss_ref, grad_ref = _loss_and_grad(logits.float(), targets, grad_loss, "torch")
    assert loss.dtype == torch.float32 and loss.shape == targets.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, loss_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(grad.float(), grad_ref, **TOLERANCES[dtype])
    assert (loss[0, :4] == 0).all() and (grad[0, :4] == 0).all()


def test_reference_is_torch_cross_entropy_on_float32_logits():
    logits = torch.randn(4, 5, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (4, 5))
    targets[1, 2] = 3
    expected = F.cross_entropy(logits.float().reshape(-1, 11), targets.reshape(-1), reduction="none").view(4, 5)
    assert torch.equal(cross_entropy_ref(logits, targets), expected)


def test_strided_rows_and_an_ignore_index_inside_the_vocabulary():
    # logits_to_keep and slicing hand the op views; ignore_index may be an ordinary id (then that id is left out).
    wide = torch.randn(2, 6, 40, device=DEVICE)
    logits = wide[:, ::2, :33]
    targets = torch.randint(0, 33, (2, 3), device=DEVICE)
    targets[1, 1] = 5
    grad_loss = torch.rand(2, 3, device=DEVICE)
    loss, grad = _loss_and_grad(logits, targets, grad_loss, "triton", ignore_index=5)
    loss_ref, grad_ref = _loss_and_grad(logits, targets, grad_loss, "torch", ignore_index=5)
    torch.testing.assert_close(loss, loss_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(grad, grad_ref, **TOLERANCES[torch.float32])
    assert loss[1, 1] == 0


def test_a_target_outside_the_vocabulary_gives_nan_on_the_kernel():
    logits = torch.randn(1, 3, 10, device=DEVICE)
    targets = torch.tensor([[1, 10, 2]], device=DEVICE)
    loss = cross_entropy(logits, targets, backend="triton")
    assert torch.isnan(loss[0, 1]) and torch.isfinite(loss[0, [0, 2]]).all()
    with pytest.raises(IndexError):
        cross_entropy(logits.cpu(), targets.cpu(), backend="torch")


def test_large_logits_do_not_overflow():
    logits = torch.tensor([[[1e4, 0.0, -1e4], [-1e38, 1e38, 0.0]]], device=DEVICE)
    targets = torch.tensor([[0, 1]], device=DEVICE)
    loss = cross_entropy(logits, targets, backend="triton")
    torch.testing.assert_close(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("logits, targets, message", [
    (torch.randint(0, 3, (2, 4)), torch.zeros(2, dtype=torch.long), "floating-point"),
    (torch.randn(2, 4), torch.zeros(2), "integer"),
    (torch.randn(2, 4), torch.zeros(3, dtype=torch.long), r"shape of logits without the vocabulary dim, \(2,\)"),
])
def test_bad_inputs_name_the_argument(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        cross_entropy(logits, targets)
