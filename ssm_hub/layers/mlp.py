"""The dense feed-forwards of the blocks: Llama's SwiGLU (also a mixture-of-experts' shared expert) and GPT-2's
plain MLP."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ssm_hub.layers.linear import KernelLinear, is_plain_linear
from ssm_hub.ops.linear import swiglu_linear


def _check_sizes(owner: str, **sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, with Llama's parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        _check_sizes("SwiGLUMLP", hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = KernelLinear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = KernelLinear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = KernelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if is_plain_linear(self.gate_proj) and is_plain_linear(self.up_proj):
            # One op for both projections and the gate: one kernel when decoding (see ssm_hub.ops.linear).
            gated = swiglu_linear(hidden_states, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias,
                                  self.up_proj.bias)
        else:  # an adapter or a hook on either projection: each runs as itself
            gated = F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        return self.down_proj(gated)


class PlainMLP(nn.Module):
    """``down_proj(act(up_proj(x)))``: GPT-2's MLP (its c_fc and c_proj), ``act`` one of transformers' ACT2FN."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True):
        super().__init__()
        _check_sizes("PlainMLP", hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.up_proj = KernelLinear(hidden_size, intermediate_size, bias=bias)
        self.act = ACT2FN[act]
        self.down_proj = KernelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))
