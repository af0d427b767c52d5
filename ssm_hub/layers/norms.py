"""RMSNorm and the gated, grouped RMSNorm of Mamba-2 (``norm(y * silu(z))``), computed in float32."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of ``hidden_size // n_groups`` channels, gated by ``silu(gate)``.

    ``norm_before_gate=False`` (Mamba-2's default) computes ``norm(x * silu(gate))``; ``True`` computes
    ``norm(x) * silu(gate)``. Normalising per group keeps the layer equivalent under tensor parallelism over groups.
    """

    def __init__(self, hidden_size: int, n_groups: int = 1, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        if hidden_size % n_groups != 0:
            raise ValueError(f"GatedRMSNorm: hidden_size ({hidden_size}) must be divisible by n_groups ({n_groups})")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.n_groups = n_groups
        self.variance_epsilon = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        gate = nn.functional.silu(gate.float())
        if not self.norm_before_gate:
            hidden_states = hidden_states * gate
        grouped = hidden_states.unflatten(-1, (self.n_groups, -1))
        variance = grouped.pow(2).mean(-1, keepdim=True)
        hidden_states = (grouped * torch.rsqrt(variance + self.variance_epsilon)).flatten(-2)
        if self.norm_before_gate:
            hidden_states = hidden_states * gate
        return self.weight * hidden_states.to(input_dtype)
