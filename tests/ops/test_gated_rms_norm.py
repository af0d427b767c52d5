"""The gated RMSNorm reference against a group-by-group float64 formula; the norm layers compute exactly what they
computed before they called the op; shape errors name the argument."""

import pytest
import torch

from ssm_hub.layers.norms import GatedRMSNorm, RMSNorm
from ssm_hub.ops import gated_rms_norm, recompute
from ssm_hub.ops.gated_rms_norm import gated_rms_norm_ref

F64 = torch.float64


def formula(x, weight, gate, n_groups, eps, norm_before_gate):
    """Each group on its own, in float64: x / sqrt(mean(x^2) + eps), with the gate s = z / (1 + e^-z) applied to x
    before the norm or to the result after it."""
    x, weight = x.to(F64), weight.to(F64)
    silu = None if gate is None else gate.to(F64) / (1 + torch.exp(-gate.to(F64)))
    size = x.shape[-1] // n_groups
    groups = []
    for g in range(n_groups):
        part = slice(g * size, (g + 1) * size)
        h = x[..., part] if silu is None or norm_before_gate else x[..., part] * silu[..., part]
        normed = h / torch.sqrt((h * h).sum(-1, keepdim=True) / size + eps)
        groups.append(normed * silu[..., part] if silu is not None and norm_before_gate else normed)
    return weight * torch.cat(groups, -1)


def rms_norm_before(layer, hidden_states):
    """RMSNorm.forward as it read before the op existed."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.float()
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + layer.variance_epsilon)
    return layer.weight * hidden_states.to(input_dtype)


def gated_rms_norm_before(layer, hidden_states, gate):
    """GatedRMSNorm.forward as it read before the op existed."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.float()
    gate = torch.nn.functional.silu(gate.float())
    if not layer.norm_before_gate:
        hidden_states = hidden_states * gate
    grouped = hidden_states.unflatten(-1, (layer.n_groups, -1))
    variance = grouped.pow(2).mean(-1, keepdim=True)
    hidden_states = (grouped * torch.rsqrt(variance + layer.variance_epsilon)).flatten(-2)
    if layer.norm_before_gate:
        hidden_states = hidden_states * gate
    return layer.weight * hidden_states.to(input_dtype)


@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("gated, norm_before_gate", [(False, False), (True, False), (True, True)])
def test_reference_matches_the_formula_in_float64(n_groups, gated, norm_before_gate):
    x = torch.randn(3, 5, 24, dtype=F64) * 3
    weight = torch.randn(24, dtype=F64)
    gate = torch.randn(3, 5, 24, dtype=F64) * 2 if gated else None
    y = gated_rms_norm_ref(x, weight, gate, n_groups=n_groups, eps=1e-3, norm_before_gate=norm_before_gate)
    assert y.dtype == F64
    torch.testing.assert_close(y, formula(x, weight, gate, n_groups, 1e-3, norm_before_gate), rtol=1e-12, atol=1e-12)


def test_groups_and_gate_change_the_result():
    x, weight, gate = torch.randn(4, 12, dtype=F64), torch.ones(12, dtype=F64), torch.randn(4, 12, dtype=F64)
    plain = gated_rms_norm_ref(x, weight)
    assert not torch.allclose(gated_rms_norm_ref(x, weight, n_groups=3), plain)
    before, after = (gated_rms_norm_ref(x, weight, gate, norm_before_gate=flag) for flag in (False, True))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_layer_is_unchanged(dtype):
    layer = RMSNorm(40, eps=1e-6).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
    wide = torch.randn(2, 7, 90).to(dtype)
    x = wide[..., 3:43]  # a non-contiguous view
    for inputs in (x, x.contiguous()):
        leaf = inputs.detach().requires_grad_(True)
        y = layer(leaf)
        expected_leaf = inputs.detach().requires_grad_(True)
        expected = rms_norm_before(layer, expected_leaf)
        assert y.dtype == expected.dtype
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (leaf, layer.weight), dy)
        expected_grads = torch.autograd.grad(expected, (expected_leaf, layer.weight), dy)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(layer(x.to(F64)), formula(x, layer.weight, None, 1, 1e-6, False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_layer_is_unchanged(dtype, n_groups, norm_before_gate):
    layer = GatedRMSNorm(32, n_groups=n_groups, eps=1e-5, norm_before_gate=norm_before_gate).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
    projection = torch.randn(2, 9, 80).to(dtype)
    x, gate = projection[..., :32], projection[..., 40:72]  # split from one projection, as the mixer does
    leaves = [t.detach().requires_grad_(True) for t in (x, gate)]
    expected_leaves = [t.detach().requires_grad_(True) for t in (x, gate)]
    y = layer(*leaves)
    expected = gated_rms_norm_before(layer, *expected_leaves)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (*leaves, layer.weight), dy)
    expected_grads = torch.autograd.grad(expected, (*expected_leaves, layer.weight), dy)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(y, formula(x, layer.weight, gate, n_groups, 1e-5, norm_before_gate).float())


def test_auto_on_cpu_is_the_reference():
    x, weight, gate = torch.randn(3, 16), torch.randn(16), torch.randn(3, 16)
    torch.testing.assert_close(
        gated_rms_norm(x, weight, gate, n_groups=2), gated_rms_norm_ref(x, weight, gate, n_groups=2), rtol=0, atol=0
    )


def test_torch_path_keeps_only_its_inputs_under_grad(monkeypatch):
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x, weight, gate = torch.randn(3, 16), torch.randn(16, requires_grad=True), torch.randn(3, 16)
    with torch.no_grad():
        gated_rms_norm(x, weight, gate, backend="torch")
    assert calls == []
    gated_rms_norm(x, weight, gate, backend="torch").sum().backward()
    assert calls == [1] and weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(x=torch.randn(3, 8), weight=torch.randn(7)), "weight"),
        (dict(x=torch.randn(3, 8), weight=torch.randn(8, 1)), "weight"),
        (dict(x=torch.randn(3, 8), weight=torch.randn(8), gate=torch.randn(3, 4)), "gate"),
        (dict(x=torch.randn(3, 8), weight=torch.randn(8), n_groups=3), "n_groups"),
        (dict(x=torch.randn(3, 8), weight=torch.randn(8), n_groups=0), "n_groups"),
        (dict(x=torch.tensor(1.0), weight=torch.randn(1)), "x"),
        (dict(x=torch.ones(3, 8, dtype=torch.long), weight=torch.randn(8)), "x"),
        (dict(x=torch.randn(3, 8), weight=torch.randn(8), eps=-1.0), "eps"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, backend):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        gated_rms_norm(**kwargs, backend=backend)


def test_add_rms_norm_is_the_blocks_add_then_norm(monkeypatch):
    """The torch path is the residual add then the RMSNorm of the sum in the weight's dtype; the kernel is refused
    where it does not apply (a gradient is needed, or x is not in the weight's dtype), and bad shapes are named."""
    from ssm_hub.ops.gated_rms_norm import add_rms_norm

    x, residual, weight = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.rand(16) + 0.5
    normed, total = add_rms_norm(x, residual, weight)
    torch.testing.assert_close(total, residual + x, rtol=0, atol=0)
    torch.testing.assert_close(normed, gated_rms_norm(residual + x, weight), rtol=0, atol=0)
    # A bf16 block with a float32 stream: the sum stays float32, the norm reads it rounded to bf16.
    low_x, low_weight = x.bfloat16(), weight.bfloat16()
    normed, total = add_rms_norm(low_x, residual, low_weight, backend="torch")
    assert total.dtype == torch.float32 and normed.dtype == torch.bfloat16
    torch.testing.assert_close(total, residual + low_x.float(), rtol=0, atol=0)
    expected = gated_rms_norm((residual + low_x.float()).bfloat16(), low_weight)
    torch.testing.assert_close(normed, expected, rtol=0, atol=0)
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")  # forcing the kernels leaves uncovered calls in torch
    add_rms_norm(x, residual, weight.clone().requires_grad_(True))
    for args in ((x, residual, weight.clone().requires_grad_(True)), (x, residual, weight.bfloat16())):
        with pytest.raises(NotImplementedError, match="add_rms_norm.*no Triton kernel"):
            add_rms_norm(*args, backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, residual[:, :2], weight)
