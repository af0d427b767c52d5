"""ssm_hub.ops.kernel_op: a kernel's custom op is called directly in plain eager code, recorded for autograd by a
plain autograd.Function with the op's formula, and goes through the dispatcher wherever something needs it
(torch.compile, dispatch modes, forward AD, subclasses). Run: pytest tests/ops/test_kernel_op.py"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ssm_hub.backend import triton_available

from ssm_hub.ops.kernel_op import kernel_op, needs_dispatcher

calls = []


@kernel_op("ssm_hub_test::scale", mutates_args=())
def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    calls.append("scale")
    return x * factor


@scale.register_fake
def _(x, factor):
    return torch.empty_like(x)


scale.register_autograd(lambda ctx, grad: (grad * ctx.factor, None),
                        setup_context=lambda ctx, inputs, output: setattr(ctx, "factor", inputs[1]))


@kernel_op("ssm_hub_test::add_into_", mutates_args=("out",))
def add_into(out: torch.Tensor, x: torch.Tensor) -> None:
    calls.append("add_into")
    out.add_(x)


@add_into.register_fake
def _(out, x):
    return None


def _dispatched(function, *args):
    """(result, whether the call went through the registered op)."""
    seen = []
    op = function.op
    function.op = lambda *a: seen.append(True) or op(*a)
    try:
        return function(*args), bool(seen)
    finally:
        function.op = op


def test_plain_eager_calls_skip_the_dispatcher_and_bump_version_counters():
    x = torch.randn(4)
    result, dispatched = _dispatched(scale, x, 2.0)
    assert not dispatched and torch.equal(result, x * 2)
    out = torch.zeros(4)
    version = out._version
    _, dispatched = _dispatched(add_into, out, x)
    assert not dispatched and torch.equal(out, x) and out._version > version
    with torch.no_grad():  # no_grad: nothing to record even for an input that requires grad
        _, dispatched = _dispatched(scale, x.requires_grad_(), 2.0)
    assert not dispatched


def test_autograd_records_the_call_with_the_ops_formula_without_the_dispatcher():
    x = torch.randn(4, requires_grad=True)
    result, dispatched = _dispatched(scale, x, 3.0)
    assert not dispatched and type(result.grad_fn).__name__ == "Directssm_hub_test_scaleBackward"
    result.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 3.0))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_direct_autograd_matches_the_op_on_a_kernel_with_defaults():
    # The gated norm's op has default arguments its setup_context reads; both paths give the same outputs and the
    # same gradients for every input.
    from ssm_hub.ops.gated_rms_norm.custom_ops import gated_rms_norm_fwd_op

    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU, Triton's interpreter (conftest.py)
    inputs = [torch.randn(shape, generator=generator).to(device) for shape in ((2, 5, 8), (8,), (2, 5, 8))]
    results = []
    for call in (gated_rms_norm_fwd_op, gated_rms_norm_fwd_op.op):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out, _ = call(leaves[0], leaves[1], leaves[2], 2, 1e-5, True)
        out.pow(2).sum().backward()
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for direct, dispatched in zip(*results):
        torch.testing.assert_close(direct, dispatched, rtol=0, atol=0)


def test_compile_and_fake_tensors_see_the_op():
    calls.clear()
    with FakeTensorMode():
        fake = scale(torch.empty(4), 2.0)  # the fake implementation: the function never runs
    assert calls == [] and fake.shape == (4,)
    compiled = torch.compile(lambda x: scale(x, 2.0) + 1, backend="aot_eager", fullgraph=True)
    x = torch.randn(4)
    torch.testing.assert_close(compiled(x), x * 2 + 1)


def test_forward_ad_and_tensor_subclasses_go_through_the_op():
    import torch.autograd.forward_ad as forward_ad

    class Subclass(torch.Tensor):
        pass

    x = torch.randn(4)
    assert not needs_dispatcher((x, torch.nn.Parameter(torch.randn(2), requires_grad=False), 2.0, None))
    assert needs_dispatcher((x.as_subclass(Subclass), 2.0))
    with forward_ad.dual_level():
        assert needs_dispatcher((x, 2.0))
    with torch.inference_mode():
        assert not needs_dispatcher((x, 2.0))
