"""``KernelLinear``: ``nn.Linear`` whose forward is ``ssm_hub.ops.linear``, so that decoding one sequence (one row, no
gradient) runs ssm_hub's matrix-vector kernel, and everything else cuBLAS as before.

It is an ``nn.Linear`` in every other respect (parameters, state dict, init, ``isinstance``), so PEFT wraps it as
one and its adapters' forward still calls it. ``is_plain_linear`` says when a fused path may read its weight directly.
"""

import torch
from torch import nn

from ssm_hub.layers.peft_compat import is_unhooked
from ssm_hub.ops.linear import linear


class KernelLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """True when ``module`` computes x W^T + b and nothing else: a KernelLinear that nothing wraps or hooks (a PEFT
    adapter replaces it by its own module; see ``is_unhooked`` for hooks)."""
    return type(module) is KernelLinear and is_unhooked(module)
