"""The scans and the conv keep only their inputs for backward: their references run checkpointed under grad."""

import pytest
import torch

from ssm_hub.ops import causal_conv1d, recompute, selective_scan, ssd_chunked_scan


def _conv_inputs():
    return (torch.randn(2, 20, 6),), dict(weight=torch.randn(6, 4), activation="silu")


def _selective_scan_inputs():
    return (torch.randn(2, 20, 6),), dict(
        delta=torch.rand(2, 20, 6), A=-torch.rand(6, 4), B=torch.randn(2, 20, 4), C=torch.randn(2, 20, 4)
    )


def _ssd_inputs():
    return (torch.randn(2, 20, 4, 3),), dict(
        dt=torch.rand(2, 20, 4), A=-torch.rand(4), B=torch.randn(2, 20, 1, 5), C=torch.randn(2, 20, 1, 5),
        chunk_size=8,
    )


@pytest.mark.parametrize(
    "op, make_inputs",
    [(causal_conv1d, _conv_inputs), (selective_scan, _selective_scan_inputs), (ssd_chunked_scan, _ssd_inputs)],
)
def test_reference_is_checkpointed_only_under_grad(op, make_inputs, monkeypatch):
    calls = []
    real = recompute.checkpoint

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(recompute, "checkpoint", recording)
    (first,), kwargs = make_inputs()
    with torch.no_grad():
        plain = op(first, **kwargs)
    assert calls == []
    leaf = first.clone().requires_grad_(True)
    out = op(leaf, **kwargs)
    assert calls == [False]
    torch.testing.assert_close(out.detach(), plain)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().max() > 0
