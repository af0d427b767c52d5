"""The dense feed-forwards of the blocks: Llama's SwiGLU (also a mixture-of-experts' shared expert) and GPT-2's
plain MLP."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


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
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class PlainMLP(nn.Module):
    """``down_proj(act(up_proj(x)))``: GPT-2's MLP (its c_fc and c_proj), ``act`` one of transformers' ACT2FN."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True):
        super().__init__()
        _check_sizes("PlainMLP", hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.act = ACT2FN[act]
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))
