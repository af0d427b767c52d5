"""RMSNorm and the gated, grouped RMSNorm of Mamba-2 (``norm(y * silu(z))``), computed in float32 by one op,
``ssm_hub.ops.gated_rms_norm``."""

import torch
from torch import nn

from ssm_hub.layers.peft_compat import is_unhooked
from ssm_hub.ops.gated_rms_norm import add_rms_norm, gated_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(hidden_states, self.weight, eps=self.variance_epsilon)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's residual step and this norm after it: (this norm of (residual + x) rounded to the
        weight's dtype, residual + x), in one op (see ssm_hub.ops.gated_rms_norm.add_rms_norm). When something hooks
        or replaces this module's forward, the norm is called as the module instead, so that the hooks run."""
        if not is_unhooked(self):
            total = residual + x
            return self(total.to(self.weight.dtype)), total
        return add_rms_norm(x, residual, self.weight, eps=self.variance_epsilon)


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
        return gated_rms_norm(
            hidden_states, self.weight, gate, n_groups=self.n_groups, eps=self.variance_epsilon,
            norm_before_gate=self.norm_before_gate,
        )
