"""The SSM mixers' training step keeps the in_proj output and the scan's outputs and rebuilds the rest in backward
(Mamba-2: the conv output and the normed output, as mamba_ssm's fused path does; Mamba-1: the conv output and
dt, B, C), with unchanged outputs and gradients.

Runs the Triton kernels (on the GPU where there is one, else under TRITON_INTERPRET=1), whose scans are the custom
ops the step keeps; on the torch reference the scan already keeps only its inputs and nothing else changes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import randomised, tiny_config
from ssm_hub.backend import triton_available
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.layers.mamba_mixer import MambaMixer

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIXERS = {"ssm_hub_mamba": MambaMixer, "ssm_hub_mamba2": Mamba2Mixer}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _mixer_and_inputs(model_type):
    config = tiny_config(model_type)
    mixer = MIXERS[model_type](config, layer_idx=0)
    mixer.init_ssm_parameters(config)  # A_log, D and the dt parameters are allocated empty; the model's init fills them
    mixer = randomised(mixer).to(DEVICE).train()
    hidden = torch.randn(2, 11, config.hidden_size, device=DEVICE, requires_grad=True)
    return mixer, hidden


def _gradients(output, mixer, hidden):
    output.square().sum().backward()
    grads = [hidden.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    hidden.grad = None
    mixer.zero_grad()
    return grads


# Calls of each op in one forward + backward: the scan runs once, what is rebuilt runs twice.
EXPECTED_CALLS = {
    "ssm_hub_mamba2": {"ssm_hub.ssd_chunked_scan_fwd": 1, "ssm_hub.causal_conv1d_fwd": 2,
                       "ssm_hub.gated_rms_norm_fwd": 2},
    "ssm_hub_mamba": {"ssm_hub.selective_scan_fwd": 1, "ssm_hub.causal_conv1d_fwd": 2},
}


def test_training_step_rebuilds_what_is_cheap_but_not_the_scan(model_type, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    mixer, hidden = _mixer_and_inputs(model_type)
    with OpCounter() as counter:
        mixer(hidden).square().sum().backward()
    assert {name: counter.counts.get(name) for name in EXPECTED_CALLS[model_type]} == EXPECTED_CALLS[model_type]


def _without_recomputation(mixer, hidden):
    if isinstance(mixer, Mamba2Mixer):
        gate, xBC, dt = mixer.in_proj(hidden).split(
            [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1
        )
        return mixer._sequence(gate, xBC, dt, None, None, None, None, False, hidden.dtype)[0]
    x, gate = mixer.in_proj(hidden).chunk(2, dim=-1)
    return mixer.out_proj(mixer._sequence(x, gate, None, None, None, None, False)[0])


def test_recomputation_leaves_outputs_and_gradients_unchanged(model_type, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    mixer, hidden = _mixer_and_inputs(model_type)
    out = mixer(hidden)
    kept = _gradients(out, mixer, hidden)
    plain = _without_recomputation(mixer, hidden)
    torch.testing.assert_close(out, plain)
    for got, expected in zip(kept, _gradients(plain, mixer, hidden)):
        torch.testing.assert_close(got, expected)
