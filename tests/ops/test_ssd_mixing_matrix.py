"""The SSD scan written as one [T, T] matrix per head (ssm_hub.ops.ssd.ssd_mixing_matrix, used by distillation's
matrix orientation) gives the recurrence's output: y = M x + D x, documents included, and the Mamba-2 mixer's
mixing_matrix is the matrix of the scan it runs."""

import torch

from conftest import randomised, tiny_config
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.ops.causal_conv1d import causal_conv1d
from ssm_hub.ops.ssd import ssd_mixing_matrix, ssd_naive_ref


def test_the_matrix_times_x_is_the_scan():
    torch.manual_seed(0)
    batch, seqlen, heads, head_dim, groups, state = 2, 9, 4, 3, 2, 5
    x, dt = torch.randn(batch, seqlen, heads, head_dim), torch.randn(batch, seqlen, heads)
    A, D, dt_bias = -torch.rand(heads) - 0.5, torch.randn(heads), torch.randn(heads)
    B, C = torch.randn(batch, seqlen, groups, state), torch.randn(batch, seqlen, groups, state)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    y = ssd_naive_ref(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, 2.0), seq_idx=seq_idx)
    matrix = ssd_mixing_matrix(dt, A, B, C, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, 2.0), seq_idx=seq_idx)
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", matrix, x) + D[:, None] * x, y)
    assert (matrix.triu(1) == 0).all() and (matrix[0, :, 4:, :4] == 0).all()  # causal, and no path across documents


def test_the_mixers_matrix_is_the_scan_it_runs(monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "torch")
    config = tiny_config("ssm_hub_mamba2")
    mixer = Mamba2Mixer(config, layer_idx=0)
    mixer.init_ssm_parameters(config)
    mixer = randomised(mixer).eval()
    hidden = torch.randn(2, 7, config.hidden_size)
    captured = {}
    mixer.norm.register_forward_pre_hook(lambda module, args: captured.update(y=args[0]))  # the scan's output
    mixer(hidden)
    _, xBC, _ = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    weight, bias = mixer._conv_parameters()
    x = causal_conv1d(xBC, weight, bias, activation="silu")[..., : mixer.intermediate_size]
    x = x.reshape(2, 7, mixer.num_heads, mixer.head_dim)
    expected = torch.einsum("bhts,bshp->bthp", mixer.mixing_matrix(hidden), x) + mixer.D[:, None] * x
    torch.testing.assert_close(expected.reshape(2, 7, -1), captured["y"])
