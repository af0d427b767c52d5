"""The Mamba-2 mixer's training step keeps the in_proj output and the scan's output and rebuilds the conv output and
the normed output in backward (as mamba_ssm's fused path does), with unchanged gradients.

Runs the Triton kernels (on the GPU where there is one, else under TRITON_INTERPRET=1), whose scan is the custom op
the step keeps.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import randomised, tiny_config
from ssm_hub.backend import triton_available
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _mixer_and_inputs():
    config = tiny_config("ssm_hub_mamba2")
    mixer = Mamba2Mixer(config, layer_idx=0)
    mixer.init_ssm_parameters(config)  # A_log, D and dt_bias are allocated empty; the model's init fills them
    mixer = randomised(mixer).to(DEVICE).train()
    hidden = torch.randn(2, 11, config.hidden_size, device=DEVICE, requires_grad=True)
    return mixer, hidden


def _gradients(output, mixer, hidden):
    output.square().sum().backward()
    grads = [hidden.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    hidden.grad = None
    mixer.zero_grad()
    return grads


def test_training_step_recomputes_conv_and_norm_but_not_the_scan(monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    mixer, hidden = _mixer_and_inputs()
    with OpCounter() as counter:
        mixer(hidden).square().sum().backward()
    counts = counter.counts
    assert counts["ssm_hub.ssd_chunked_scan_fwd"] == 1  # kept from the forward
    assert counts["ssm_hub.causal_conv1d_fwd"] == 2  # forward, then rebuilt for the scan's backward
    assert counts["ssm_hub.gated_rms_norm_fwd"] == 2  # forward, then rebuilt for out_proj's backward


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_recomputation_leaves_outputs_and_gradients_unchanged(backend, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", backend)
    mixer, hidden = _mixer_and_inputs()
    out = mixer(hidden)
    kept = _gradients(out, mixer, hidden)
    gate, xBC, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    plain, _, _ = mixer._sequence(gate, xBC, dt, None, None, None, None, False, hidden.dtype)  # nothing recomputed
    torch.testing.assert_close(out, plain)
    for got, expected in zip(kept, _gradients(plain, mixer, hidden)):
        torch.testing.assert_close(got, expected)
