"""The matrix-vector kernel (decoding's projections, SwiGLU's two with their gate, and a projection of the gated
RMSNorm's output, and one followed by the causal conv1d's decode step on part of its outputs) against float32
references: sizes that no block divides, with and without bias, a row cut from a wider tensor, bf16 and fp16, and
torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from kernel_testing import DEVICE, requires_triton
from ssm_hub.ops.gated_rms_norm import gated_rms_norm_ref
from ssm_hub.ops.linear import gated_rms_norm_linear, linear, linear_conv_step, linear_conv_step_ref, swiglu_linear

pytestmark = requires_triton

# The kernel sums in float32 and rounds once; the reference is float32 on the same (bf16 / fp16) values. What is
# left is that one rounding of y (2^-8 relative in bf16, 2^-11 in fp16) plus float32 sums in another order; the
# atol covers outputs near zero, where sums of K terms of size ~1 cancel.
TOLERANCES = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
# The normed projection also rounds its input twice (as the norm op does); a rounding may land one step away from the
# reference's (Triton's CPU interpreter truncates where the GPU rounds to nearest), and K such steps add up in y.
NORMED_TOLERANCES = {torch.bfloat16: dict(rtol=1e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=4e-3)}


def _inputs(out_features, in_features, dtype, bias, swiglu):
    x = torch.randn(1, in_features, device=DEVICE).to(dtype)
    weights = [(torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5).to(dtype)
               for _ in range(2 if swiglu else 1)]
    biases = [torch.randn(out_features, device=DEVICE).to(dtype) if bias else None for _ in weights]
    return x, weights, biases


def _reference(x, weights, biases):
    upcast = [t.float() if t is not None else None for t in (x, *weights, *biases)]
    x, weights, biases = upcast[0], upcast[1:1 + len(weights)], upcast[1 + len(weights):]
    projected = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return F.silu(projected[0]) * projected[1] if len(projected) == 2 else projected[0]


def _run(x, weights, biases):
    with torch.no_grad():
        if len(weights) == 2:
            return swiglu_linear(x, weights[0], weights[1], biases[0], biases[1], backend="triton")
        return linear(x, weights[0], biases[0], backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features, in_features", [(20, 48), (100, 70), (33, 130), (1, 16), (300, 2100)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
def test_kernel_matches_reference(dtype, out_features, in_features, bias, swiglu):
    x, weights, biases = _inputs(out_features, in_features, dtype, bias, swiglu)
    out = _run(x, weights, biases)
    assert out.dtype == dtype and out.shape == (1, out_features)
    torch.testing.assert_close(out.float(), _reference(x, weights, biases), **TOLERANCES[dtype])


@pytest.mark.parametrize("which", ["gate", "up"])
def test_swiglu_with_one_bias(which):
    x, weights, _ = _inputs(20, 48, torch.bfloat16, False, True)
    bias = torch.randn(20, device=DEVICE).to(torch.bfloat16)
    biases = [bias, None] if which == "gate" else [None, bias]
    torch.testing.assert_close(_run(x, weights, biases).float(), _reference(x, weights, biases),
                               **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
def test_leading_dimensions_and_a_row_cut_from_a_wider_tensor(swiglu):
    """x [1, 1, K] as a decode step gives it, a slice of a wider projection's output."""
    wide = torch.randn(1, 1, 3 * 40, device=DEVICE).to(torch.bfloat16)
    x = wide[..., 40:80]
    _, weights, biases = _inputs(24, 40, torch.bfloat16, True, swiglu)
    out = _run(x, weights, biases)
    assert out.shape == (1, 1, 24)
    torch.testing.assert_close(out.float(), _reference(x, weights, biases), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize("gated, norm_before_gate", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_normed_projection_matches_the_norm_then_the_projection(dtype, n_groups, gated, norm_before_gate, bias):
    """Mamba-2's out_proj(norm(y, z)) on the [1, 1, K] slices a decode step gives it: the reference norms in float32
    and rounds as the norm op does (n to the input's dtype, then the weighted output), then projects in float32; the
    kernel makes the same roundings, so what is left is the projection's one rounding and the order of sums."""
    out_features, in_features = 37, 3 * 50
    wide = torch.randn(1, 1, 3 * in_features, device=DEVICE).to(dtype)
    x, gate = wide[..., :in_features], wide[..., in_features:2 * in_features] if gated else None
    norm_weight = (torch.rand(in_features, device=DEVICE) + 0.5).to(dtype)
    _, (weight,), (bias_tensor,) = _inputs(out_features, in_features, dtype, bias, False)
    normed = gated_rms_norm_ref(x, norm_weight, gate, n_groups, 1e-5, norm_before_gate)
    expected = _reference(normed, [weight], [bias_tensor])
    with torch.no_grad():
        out = gated_rms_norm_linear(x, gate, norm_weight, weight, bias_tensor, n_groups=n_groups, eps=1e-5,
                                    norm_before_gate=norm_before_gate, backend="triton")
    assert out.dtype == dtype and out.shape == (1, 1, out_features)
    torch.testing.assert_close(out.float(), expected, **NORMED_TOLERANCES[dtype])


def test_normed_projection_of_several_rows_or_with_gradients_is_the_two_ops():
    x, gate = torch.randn(2, 3, 16, device=DEVICE).to(torch.bfloat16).unbind(0)
    norm_weight = torch.ones(16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8, 16, device=DEVICE).to(torch.bfloat16)
    out = gated_rms_norm_linear(x, gate, norm_weight, weight, n_groups=2)
    out.float().sum().backward()
    expected = linear(gated_rms_norm_ref(x, norm_weight.detach(), gate, 2), weight)
    torch.testing.assert_close(out.detach(), expected, **TOLERANCES[torch.bfloat16])
    assert norm_weight.grad is not None and norm_weight.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="gated_rms_norm_linear"):
        gated_rms_norm_linear(x, gate, norm_weight.detach(), weight, n_groups=2, backend="triton")


@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("width", [4, 3])
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
def test_projection_with_conv_step_matches_the_projection_then_the_step(dtype, state_dtype, width, conv_bias,
                                                                       activation):
    """Mamba-2's in_proj and conv on one decode token: channels 30 .. 30 + C - 1 of 101 outputs are conv channels.
    The step reads the projection as stored (rounded to x's dtype); its window shifts in place."""
    out_features, in_features, start, channels = 101, 70, 30, 45
    x, (weight,), (bias,) = _inputs(out_features, in_features, dtype, True, False)
    x = x[None]  # [B = 1, T = 1, K], as a decode step gives it
    conv_state = torch.randn(1, channels, width - 1, device=DEVICE).to(state_dtype)
    conv_weight = torch.randn(channels, width, device=DEVICE) * 0.5
    conv_b = torch.randn(channels, device=DEVICE) if conv_bias else None
    expected_state = conv_state.clone()
    with torch.no_grad():
        projected, conv_out = linear_conv_step(x, weight, bias, conv_state, conv_weight, conv_b, start, activation,
                                               backend="triton")
    # The reference on the kernel's own rounded projection: the step itself is then exact up to float32 sums.
    _, want_conv, want_state = linear_conv_step_ref(projected.float(), torch.eye(out_features, device=DEVICE), None,
                                                    expected_state, conv_weight, conv_b, start, activation)
    assert projected.shape == (1, 1, out_features) and conv_out.shape == (1, channels) and conv_out.dtype == dtype
    torch.testing.assert_close(projected.float(), _reference(x, [weight], [bias]), **TOLERANCES[dtype])
    torch.testing.assert_close(conv_out.float(), want_conv.float(), **TOLERANCES[dtype])
    torch.testing.assert_close(conv_state, want_state.to(state_dtype), rtol=0, atol=0)


def test_projection_with_conv_step_on_several_rows_is_the_two_ops():
    x = torch.randn(2, 1, 24, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(40, 24, device=DEVICE).to(torch.bfloat16)
    conv_state = torch.randn(2, 16, 3, device=DEVICE).to(torch.bfloat16)
    conv_weight = torch.randn(16, 4, device=DEVICE).to(torch.bfloat16)
    want_projected, want_conv, want_state = linear_conv_step_ref(x, weight, None, conv_state, conv_weight, None, 8,
                                                                 "silu")
    with torch.no_grad():
        projected, conv_out = linear_conv_step(x, weight, None, conv_state, conv_weight, None, 8, "silu")
    torch.testing.assert_close(projected, want_projected)
    torch.testing.assert_close(conv_out, want_conv)
    torch.testing.assert_close(conv_state, want_state)
    with pytest.raises(ValueError, match="conv channels 30 .. 45 must lie within the projection's 40 outputs"):
        linear_conv_step(x[:1], weight, None, conv_state[:1], conv_weight, None, 30, "silu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiles_without_graph_breaks():
    x, (gate, up), _ = _inputs(64, 96, torch.bfloat16, False, True)

    def projections(x, gate, up):
        return swiglu_linear(x, gate, up) * 2 + linear(x, gate)

    with torch.no_grad():
        expected = projections(x, gate, up)
        got = torch.compile(projections, fullgraph=True)(x, gate, up)
    torch.testing.assert_close(got, expected)
