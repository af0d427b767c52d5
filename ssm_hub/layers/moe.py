"""The mixture-of-experts feed-forward: a top-k router, routed SwiGLU experts with fused 3-D weights, an optional
shared expert, and the router's auxiliary losses.

Parameter names and layouts follow transformers v5, so that converting a Jamba, Mixtral or Qwen-MoE checkpoint is
a rename: the router's ``weight`` [E, H] (Jamba names the router ``router``, Mixtral and Qwen ``gate``), the experts'
``gate_up_proj`` [E, 2 * I, H] (gate rows first, then up rows) and ``down_proj`` [E, H, I], and Qwen2-MoE's
``shared_expert`` (a Llama-style MLP) and ``shared_expert_gate`` (Linear(H, 1)). The experts' math is the op
``ssm_hub.ops.moe.moe_experts``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssm_hub.layers.mlp import SwiGLUMLP
from ssm_hub.ops.moe import IMPLEMENTATIONS, moe_experts

SCORINGS = ("softmax", "sigmoid")


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")


def _check_top_k(owner: str, name: str, top_k, num_experts: int) -> None:
    _check_positive_int(owner, name, top_k)
    if top_k > num_experts:
        raise ValueError(f"{owner}: {name} must be at most num_experts={num_experts}, got {top_k}")


class MoEExperts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters; forward(hidden [T, H], expert_indices [T, k],
    expert_weights [T, k]) -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, implementation: str = "auto"):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            _check_positive_int("MoEExperts", name, value)
        _check_choice("MoEExperts", "implementation", implementation, IMPLEMENTATIONS)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.implementation = implementation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default for each expert's projections: uniform within 1 / sqrt(fan_in).
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        bound = 1 / math.sqrt(self.intermediate_size)
        nn.init.uniform_(self.down_proj, -bound, bound)

    def forward(self, hidden_states, expert_indices, expert_weights) -> torch.Tensor:
        return moe_experts(hidden_states, expert_indices, expert_weights, self.gate_up_proj, self.down_proj,
                           implementation=self.implementation)


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the top k.

    ``weight`` [E, H] is a bias-free Linear(H, E) stored as transformers stores its routers. ``scoring`` "softmax"
    (Mixtral, Jamba, Qwen-MoE) or "sigmoid" (DeepSeek-V3 style) turns the logits into scores in float32; the top k
    scores are the routing weights, renormalised to sum to 1 over the k experts when ``norm_topk_prob``.

    forward(hidden [..., H]) -> (router_logits [N, E] in hidden's dtype, weights [N, k] float32, indices [N, k])
    with N the number of tokens.
    """

    def __init__(self, hidden_size: int, num_experts: int, num_experts_per_tok: int, scoring: str = "softmax",
                 norm_topk_prob: bool = True):
        super().__init__()
        _check_positive_int("TopKRouter", "hidden_size", hidden_size)
        _check_positive_int("TopKRouter", "num_experts", num_experts)
        _check_top_k("TopKRouter", "num_experts_per_tok", num_experts_per_tok, num_experts)
        _check_choice("TopKRouter", "scoring", scoring, SCORINGS)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.scoring = scoring
        self.norm_topk_prob = bool(norm_topk_prob)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, hidden_states: torch.Tensor):
        router_logits = F.linear(hidden_states.reshape(-1, self.hidden_size), self.weight)
        logits = router_logits.float()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        weights, indices = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            # Sigmoid scores can all underflow to 0: a floor on the sum keeps such a token's weights at 0, not NaN.
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return router_logits, weights, indices


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional shared expert that every token goes through.

    Args:
        hidden_size: H.
        num_experts: E, the number of routed experts.
        num_experts_per_tok: k, the experts each token is routed to (1 <= k <= E).
        moe_intermediate_size: I, the intermediate size of each routed expert.
        scoring: "softmax" or "sigmoid", see :class:`TopKRouter`.
        norm_topk_prob: renormalise the k routing weights of each token to sum to 1.
        shared_expert_intermediate_size: the shared expert's intermediate size; 0 or None for no shared expert.
        shared_expert_gate: scale the shared expert's output by ``sigmoid(Linear(H, 1)(x))`` (Qwen2-MoE).
        implementation: the experts' implementation, "auto", "loop" or "grouped_mm" (see ``ssm_hub.ops.moe``).

    forward(hidden [B, T, H]) -> (output [B, T, H], router_logits [B * T, E]); the logits feed
    :func:`load_balancing_loss` and :func:`router_z_loss`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        moe_intermediate_size: int,
        scoring: str = "softmax",
        norm_topk_prob: bool = True,
        shared_expert_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        implementation: str = "auto",
    ):
        super().__init__()
        _check_positive_int("SparseMoE", "hidden_size", hidden_size)
        _check_positive_int("SparseMoE", "num_experts", num_experts)
        _check_top_k("SparseMoE", "num_experts_per_tok", num_experts_per_tok, num_experts)
        _check_positive_int("SparseMoE", "moe_intermediate_size", moe_intermediate_size)
        _check_choice("SparseMoE", "scoring", scoring, SCORINGS)
        _check_choice("SparseMoE", "implementation", implementation, IMPLEMENTATIONS)
        shared_size = shared_expert_intermediate_size or 0
        if shared_size:
            _check_positive_int("SparseMoE", "shared_expert_intermediate_size", shared_size)
        elif shared_expert_gate:
            raise ValueError("SparseMoE: shared_expert_gate=True needs a shared expert, but "
                             f"shared_expert_intermediate_size is {shared_expert_intermediate_size!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.router = TopKRouter(hidden_size, num_experts, num_experts_per_tok, scoring, norm_topk_prob)
        self.experts = MoEExperts(num_experts, hidden_size, moe_intermediate_size, implementation)
        self.shared_expert = SwiGLUMLP(hidden_size, shared_size) if shared_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor):
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseMoE: hidden_states must have shape [B, T, H] with H = {self.hidden_size}, "
                             f"got {tuple(hidden_states.shape)}")
        tokens = hidden_states.reshape(-1, self.hidden_size)
        router_logits, weights, indices = self.router(tokens)
        out = self.experts(tokens, indices, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        return out.reshape(hidden_states.shape), router_logits


def _flat_logits_and_mask(router_logits, attention_mask):
    """Per-layer router logits [N, E] (one tensor, or a sequence of one per layer) -> ([L * N, E] float32,
    [L * N] float32 mask or None), the mask [B, T] (N = B * T) repeated for every layer."""
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers or any(not isinstance(layer, torch.Tensor) or layer.dim() != 2 for layer in layers):
        raise ValueError("router_logits must be a tensor [N, E] or a non-empty sequence of them (one per layer)")
    if any(layer.shape != layers[0].shape for layer in layers):
        raise ValueError(f"router_logits of every layer must have the same shape [N, E], "
                         f"got {[tuple(layer.shape) for layer in layers]}")
    logits = torch.cat([layer.float() for layer in layers]) if len(layers) > 1 else layers[0].float()
    if attention_mask is None:
        return logits, None
    tokens = layers[0].shape[0]
    if attention_mask.numel() != tokens:
        raise ValueError(f"attention_mask must have B * T = {tokens} entries, one per row of router_logits, "
                         f"got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
    return logits, mask.repeat(len(layers))


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """The Switch Transformer / Mixtral auxiliary loss: ``E * sum_e f_e * P_e``.

    ``f_e`` is the number of top-k assignments to expert e divided by the number of tokens (so the f_e sum to k),
    ``P_e`` the mean softmax probability of expert e. The top k come from the softmax of the logits, whatever the
    router's scoring (softmax and sigmoid rank experts alike). Perfectly balanced routing gives k. Equal to
    transformers' ``load_balancing_loss_func``.

    Args:
        router_logits: [N, E], or a sequence of them, one per layer, pooled as one set of L * N tokens.
        num_experts: E.
        top_k: k, the experts per token.
        attention_mask: optional [B, T] with B * T = N, 1 for real tokens and 0 for padding, which is left out.
    """
    logits, mask = _flat_logits_and_mask(router_logits, attention_mask)
    _check_positive_int("load_balancing_loss", "num_experts", num_experts)
    if logits.shape[1] != num_experts:
        raise ValueError(f"load_balancing_loss: num_experts must equal the last dim of router_logits "
                         f"({logits.shape[1]}), got {num_experts}")
    _check_top_k("load_balancing_loss", "top_k", top_k, num_experts)
    probs = logits.softmax(dim=-1)
    selected = probs.topk(top_k, dim=-1).indices  # [N, k]
    token_weights = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask
    assignments = torch.zeros(num_experts, device=probs.device).scatter_add(
        0, selected.reshape(-1), token_weights.repeat_interleave(top_k))
    prob_sums = (probs * token_weights[:, None]).sum(dim=0)
    tokens = token_weights.sum().clamp_min(1e-9)  # all padding: a loss of 0, not NaN
    return num_experts * torch.sum((assignments / tokens) * (prob_sums / tokens))


def router_z_loss(router_logits, attention_mask=None) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of ``logsumexp(logits)^2``, which keeps the logits small.

    ``router_logits`` and ``attention_mask`` as in :func:`load_balancing_loss`; padding tokens are left out.
    """
    logits, mask = _flat_logits_and_mask(router_logits, attention_mask)
    squared = logits.logsumexp(dim=-1).square()
    if mask is None:
        return squared.mean()
    return (squared * mask).sum() / mask.sum().clamp_min(1e-9)
