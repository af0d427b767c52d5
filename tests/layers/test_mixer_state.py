"""The SSM mixers' shared state plumbing (ssm_hub.layers.mixer_state): a layer's cache slots as a forward reads them,
and the conv over a sequence, with its final window and padded positions zeroed after the conv's bias."""

import torch
from transformers.cache_utils import DynamicCache

from conftest import tiny_config
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.layers.mixer_state import cached_states, conv_over_sequence
from ssm_hub.ops.causal_conv1d import causal_conv1d


def test_cached_states_reads_the_layer_slots():
    config = tiny_config("ssm_hub_mamba2")
    assert cached_states(None, 1, 5, None, config.conv_kernel) == (0, None, None)
    cache = DynamicCache(config=config)
    mixer = Mamba2Mixer(config, layer_idx=1).eval()
    with torch.no_grad():
        mixer(torch.randn(2, 5, config.hidden_size), cache=cache)
    stepped, conv_state, ssm_state = cached_states(cache, 1, 1, None, config.conv_kernel)
    assert stepped == 0
    assert conv_state is cache.get_conv_state(1) and ssm_state is cache.get_recurrent_state(1)
    assert conv_state is not None and ssm_state is not None


def test_conv_over_sequence_zeroes_padding_and_returns_the_window_when_asked():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 8), torch.randn(8, 4), torch.randn(8)
    initial = torch.randn(2, 8, 3)
    mask = torch.ones(2, 6)
    mask[0, :2] = 0
    expected, expected_state = causal_conv1d(x, weight, bias, activation="silu", initial_state=initial,
                                             return_final_state=True)
    out, state = conv_over_sequence(x, weight, bias, initial, None, mask, want_state=True)
    torch.testing.assert_close(state, expected_state)
    torch.testing.assert_close(out, expected * mask[..., None])
    assert (out[0, :2] == 0).all() and (expected[0, :2] != 0).any()
    out, state = conv_over_sequence(x, weight, bias, initial, None, None, want_state=False)
    assert state is None
    torch.testing.assert_close(out, expected)
