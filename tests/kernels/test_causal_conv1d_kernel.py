"""The causal conv1d kernels against the reference: forward, final states and every gradient (x, weight, bias,
initial state, through the final state too), widths 2-4, seq_idx and cu_seqlens documents, fp32 and bf16, strided
inputs, determinism, and the custom ops' registration."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.causal_conv1d import causal_conv1d

pytestmark = requires_triton

WIDTHS = [2, 3, 4]


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def make_inputs(batch, seqlen, channels, width, dtype=torch.float32, num_states=None, bias=True, state=True):
    return dict(
        x=rand(batch, seqlen, channels, seed=0, dtype=dtype),
        weight=rand(channels, width, seed=1, dtype=dtype),
        bias=rand(channels, seed=2, dtype=dtype) if bias else None,
        initial_state=rand(num_states or batch, channels, width - 1, seed=3, dtype=dtype) if state else None,
    )


def run(backend, inputs, activation="silu", **varlen):
    """(y, final_state, grads of every tensor input) of a loss that reads y and the final state."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items() if t is not None}
    y, final = causal_conv1d(**leaves, activation=activation, return_final_state=True, backend=backend, **varlen)
    loss = (y.float() * rand(*y.shape, seed=4)).sum() + (final.float() * rand(*final.shape, seed=5)).sum()
    loss.backward()
    return y, final, {name: leaf.grad for name, leaf in leaves.items()}


def assert_matches_reference(inputs, activation="silu", tolerances=None, **varlen):
    y, final, grads = run("triton", inputs, activation, **varlen)
    y_ref, final_ref, grads_ref = run("torch", inputs, activation, **varlen)
    tolerances = tolerances or TOLERANCES[inputs["x"].dtype]
    assert y.dtype == y_ref.dtype and final.dtype == final_ref.dtype
    torch.testing.assert_close(y, y_ref, **tolerances)
    torch.testing.assert_close(final, final_ref, **tolerances)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == grads_ref[name].dtype, name
        torch.testing.assert_close(grad, grads_ref[name], **tolerances, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("seqlen", [1, 63, 257])
def test_kernel_matches_reference(seqlen, width, activation):
    assert_matches_reference(make_inputs(2, seqlen, 6, width), activation)


@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_without_bias_or_initial_state(width):
    assert_matches_reference(make_inputs(2, 20, 5, width, bias=False, state=False))
    assert_matches_reference(make_inputs(1, 2, 5, width, bias=False, state=False), activation=None)


@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_seq_idx_restarts_the_window(width):
    # Row 0: documents of 1, 2, 9, 52, 1, 63 and 22 tokens, some starting on or next to a tile boundary; row 1: 148
    # tokens then 2 (a last document shorter than the window).
    seq_idx = torch.zeros(2, 150, dtype=torch.int32, device=DEVICE)
    for start in (1, 3, 12, 64, 65, 128):
        seq_idx[0, start:] += 1
    seq_idx[1, 148:] = 7
    assert_matches_reference(make_inputs(2, 150, 6, width), seq_idx=seq_idx)
    # Only the row's first document reads the initial state, and it may be shorter than the window.
    seq_idx[1, 1:] = 9
    assert_matches_reference(make_inputs(2, 150, 6, width), activation=None, seq_idx=seq_idx)


@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_cu_seqlens_documents_have_their_own_states(width):
    # Documents of 1, 2, 60, 1, 1, 63 and 12 tokens (some shorter than the window, some starting on a tile boundary),
    # each with its own initial and final state.
    cu_seqlens = torch.tensor([0, 1, 3, 63, 64, 65, 128, 140], dtype=torch.int32, device=DEVICE)
    assert_matches_reference(make_inputs(1, 140, 6, width, num_states=7), cu_seqlens=cu_seqlens)
    assert_matches_reference(make_inputs(1, 140, 6, width, state=False), activation=None, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_bf16(width):
    seq_idx = torch.zeros(2, 63, dtype=torch.int64, device=DEVICE)
    seq_idx[:, 30:] = 1
    assert_matches_reference(make_inputs(2, 63, 6, width, dtype=torch.bfloat16), seq_idx=seq_idx)


def test_kernel_bf16_inputs_with_float32_parameters_and_state():
    inputs = make_inputs(2, 33, 6, 4)
    inputs["x"] = inputs["x"].bfloat16()
    assert_matches_reference(inputs, tolerances=TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("width", [3, 4])
def test_kernel_takes_strided_inputs(width):
    # x as the models pass it: a slice along C of a wider projection; the state as a transposed [B, K - 1, C] buffer.
    wide = rand(2, 40, 16, seed=6).requires_grad_(True)
    state_buffer = rand(2, width - 1, 5, seed=7).requires_grad_(True)
    weight, bias = rand(5, width, seed=1).requires_grad_(True), rand(5, seed=2).requires_grad_(True)
    outputs = {}
    for backend in ("triton", "torch"):
        leaves = (wide, state_buffer, weight, bias)
        for leaf in leaves:
            leaf.grad = None
        x, state = wide[..., 3:8], state_buffer.transpose(1, 2)
        assert not x.is_contiguous() and not state.is_contiguous()
        y, final = causal_conv1d(x, weight, bias, "silu", initial_state=state, return_final_state=True,
                                 backend=backend)
        # An upstream gradient that is itself a strided view.
        upstream = rand(2, 40, 10, seed=8)[..., ::2]
        ((y * upstream).sum() + final.square().sum()).backward()
        outputs[backend] = (y, final, *[leaf.grad for leaf in leaves])
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_kernel_is_deterministic():
    cu_seqlens = torch.tensor([0, 5, 130, 150], device=DEVICE)
    inputs = make_inputs(1, 150, 6, 4, num_states=3)
    first, second = run("triton", inputs, cu_seqlens=cu_seqlens), run("triton", inputs, cu_seqlens=cu_seqlens)
    for a, b in zip([*first[:2], *first[2].values()], [*second[:2], *second[2].values()]):
        assert torch.equal(a, b)


def test_kernel_forward_only_and_final_state_only_gradients():
    inputs = make_inputs(2, 9, 4, 3)
    y = causal_conv1d(**inputs, activation="silu", backend="triton")
    torch.testing.assert_close(y, causal_conv1d(**inputs, activation="silu", backend="torch"))
    # A loss on the final state alone still reaches x and the initial state.
    grads = {}
    for backend in ("triton", "torch"):
        x, state = inputs["x"].clone().requires_grad_(True), inputs["initial_state"].clone().requires_grad_(True)
        _, final = causal_conv1d(x, inputs["weight"], initial_state=state, return_final_state=True, backend=backend)
        final.sum().backward()
        grads[backend] = (x.grad, state.grad)
    torch.testing.assert_close(grads["triton"], grads["torch"])


def test_custom_ops_are_registered_for_compile_and_autograd():
    # Schema, fake implementation (the shapes torch.compile traces with), autograd registration, AOT dispatch.
    inputs = make_inputs(1, 7, 3, 3, num_states=2)
    args = [inputs[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "initial_state")]
    cu_seqlens = torch.tensor([0, 2, 7], device=DEVICE)
    torch.library.opcheck(torch.ops.ssm_hub.causal_conv1d_fwd.default, (*args, None, cu_seqlens, True))
