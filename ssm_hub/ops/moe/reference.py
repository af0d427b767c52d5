"""Pure-torch routed experts of a mixture-of-experts feed-forward: the specification every ``moe_experts``
implementation must match.

Notation: T tokens, H hidden size, E experts of intermediate size I, k experts per token. A router has already
chosen, for every token t, k experts ``expert_indices[t]`` and their weights ``expert_weights[t]``. Expert e is a
SwiGLU feed-forward whose weights are stored fused, in the layout of transformers v5's Mixtral-style experts:

    gate_up_proj[e]  [2 * I, H]   rows [0, I) are the gate projection, rows [I, 2 * I) the up projection
    down_proj[e]     [H, I]

    expert_e(x) = down_proj[e] @ (silu(gate_e x) * up_e x)
    out_t       = sum_j expert_weights[t, j] * expert_{expert_indices[t, j]}(x_t)

Every weight is stored as ``nn.Linear`` stores its own (``[out, in]``), so an expert's projections are
``F.linear(x, gate_up_proj[e])`` and ``F.linear(h, down_proj[e])``.
"""

import torch
import torch.nn.functional as F

from ssm_hub.ops.varlen import check_tensor, compute_dtype


def check_inputs(hidden, expert_indices, expert_weights, gate_up_proj, down_proj) -> None:
    """Raise ``ValueError`` naming the argument unless the five tensors have consistent shapes and dtypes."""
    check_tensor("hidden", hidden, "[T, H]")
    tokens, hidden_size = hidden.shape
    check_tensor("expert_indices", expert_indices, "[T, k]", integer=True)
    if expert_indices.shape[0] != tokens or expert_indices.shape[1] < 1:
        raise ValueError(f"expert_indices must have shape [T, k] with T = {tokens} and k >= 1, "
                         f"got {tuple(expert_indices.shape)}")
    check_tensor("expert_weights", expert_weights, "[T, k]", expert_indices.shape)
    check_tensor("gate_up_proj", gate_up_proj, "[E, 2 * I, H]")
    num_experts, double_intermediate = gate_up_proj.shape[:2]
    if gate_up_proj.shape[2] != hidden_size or double_intermediate % 2 != 0 or double_intermediate == 0:
        raise ValueError(f"gate_up_proj must have shape [E, 2 * I, H] with H = {hidden_size} and I >= 1, "
                         f"got {tuple(gate_up_proj.shape)}")
    check_tensor("down_proj", down_proj, "[E, H, I]", (num_experts, hidden_size, double_intermediate // 2))


def swiglu_expert(x, gate_up, down) -> torch.Tensor:
    """One expert on its tokens: x [n, H], gate_up [2 * I, H], down [H, I] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def moe_experts_ref(hidden, expert_indices, expert_weights, gate_up_proj, down_proj) -> torch.Tensor:
    """The routed experts, one expert at a time.

    Args:
        hidden: [T, H] token activations.
        expert_indices: [T, k] integer, the experts chosen for each token, each in [0, E) (not checked: reading
            the values would copy them to the host).
        expert_weights: [T, k] float, the weight of each chosen expert.
        gate_up_proj: [E, 2 * I, H] fused gate (rows [0, I)) and up (rows [I, 2 * I)) projections.
        down_proj: [E, H, I].

    Returns:
        [T, H] in hidden's dtype: ``sum_j expert_weights[t, j] * expert_{expert_indices[t, j]}(hidden[t])``.

    Steps, for each expert e:
        1. Gather the (token, slot) pairs routed to e, and those tokens' rows of ``hidden``.
        2. SwiGLU in the weights' dtype: ``down_proj[e] @ (silu(gate) * up)``.
        3. Scale each row by its routing weight, in float32 (float64 when an input is float64).
        4. Scatter-add the rows into the float32 (float64) output at their tokens (a token reaches each expert at
           most once when its k indices differ; repeated indices simply add twice).
    Finally cast the output to hidden's dtype.
    """
    check_inputs(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    acc_dtype = compute_dtype(hidden, expert_weights, gate_up_proj, down_proj)
    out = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
    x = hidden.to(gate_up_proj.dtype)
    for expert in range(gate_up_proj.shape[0]):
        # 1. Pairs routed to this expert.
        token, slot = torch.where(expert_indices == expert)
        # 2. The expert's feed-forward on its tokens.
        y = swiglu_expert(x[token], gate_up_proj[expert], down_proj[expert])
        # 3. Routing weights.
        y = y.to(acc_dtype) * expert_weights[token, slot, None].to(acc_dtype)
        # 4. Back to the tokens.
        out = out.index_add(0, token, y)
    return out.to(hidden.dtype)
