"""The weight initialisation every ssm_hub model shares (ssm_hub.models.common): the SSM mixers' output projections,
per-modality copies included, scaled by 1/sqrt(layers), and the conv's PyTorch default; a weight loaded from a
checkpoint (marked ``_is_hf_initialized``) keeps its value, so loading never re-scales it."""

import math

import torch
from torch import nn

from conftest import tiny_config
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.models.common import init_conv1d, init_mixer


def _out_projections(mixer):
    return [mixer.out_proj.weight, *(projection.weight for projection in mixer.modality_out_proj)]


def test_init_mixer_scales_every_out_projection_but_a_loaded_one():
    config = tiny_config("ssm_hub_mamba2")
    mixer = Mamba2Mixer(config, layer_idx=0, modalities=3)
    loaded = mixer.modality_out_proj[0].weight
    loaded._is_hf_initialized = True
    before = [weight.detach().clone() for weight in _out_projections(mixer)]
    with torch.no_grad():
        init_mixer(mixer, config, rescale_prenorm_residual=True, num_layers=4)
    after = _out_projections(mixer)
    torch.testing.assert_close(after[0], before[0] / 2, rtol=0, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(after[2], before[2] / 2, rtol=0, atol=0)
    torch.testing.assert_close(mixer.D, torch.ones_like(mixer.D))


def test_init_mixer_leaves_out_projections_without_rescale():
    config = tiny_config("ssm_hub_mamba2")
    mixer = Mamba2Mixer(config, layer_idx=0)
    before = mixer.out_proj.weight.detach().clone()
    with torch.no_grad():
        init_mixer(mixer, config, rescale_prenorm_residual=False, num_layers=4)
    torch.testing.assert_close(mixer.out_proj.weight, before, rtol=0, atol=0)


def test_init_conv1d_draws_within_the_fan_in_bound_and_keeps_a_loaded_bias():
    conv = nn.Conv1d(16, 16, kernel_size=4, groups=16, bias=True)
    with torch.no_grad():
        conv.weight.fill_(5.0)
        conv.bias.fill_(5.0)
    init_conv1d(conv)
    bound = 1 / math.sqrt(1 * 4)
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    with torch.no_grad():
        conv.bias.fill_(5.0)
    conv.bias._is_hf_initialized = True
    init_conv1d(conv)
    assert (conv.bias == 5.0).all()
