"""Shared fixtures: tiny configs of every ssm_hub architecture, so each model test runs for all of them."""

import pytest
import torch

import ssm_hub


def tiny_config(model_type: str, **overrides):
    if model_type == "ssm_hub_mamba":
        fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)
        return ssm_hub.SsmHubMambaConfig(**{**fields, **overrides})
    if model_type == "ssm_hub_mamba2":
        fields = dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, n_groups=2,
            conv_kernel=4, chunk_size=8,
        )
        return ssm_hub.SsmHubMamba2Config(**{**fields, **overrides})
    raise ValueError(model_type)


MODEL_TYPES = ["ssm_hub_mamba", "ssm_hub_mamba2"]


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomised(model):
    """Perturb every parameter: transformers and ssm_hub initialise norms and D to ones, and a weight map that
    swapped two such tensors would otherwise go unnoticed in the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()
