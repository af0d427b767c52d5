"""The mixture-of-experts layers: transformers' weight layout, the router's options, the shared expert, the auxiliary
losses (against transformers' own), argument checks and LoRA on the fused expert weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.jamba.configuration_jamba import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from ssm_hub.layers.mlp import SwiGLUMLP
from ssm_hub.layers.moe import MoEExperts, SparseMoE, TopKRouter, load_balancing_loss, router_z_loss

H, E, I = 16, 4, 8


def randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module


def test_swiglu_mlp_has_llamas_names_and_math():
    mlp = SwiGLUMLP(H, 12)
    assert sorted(name for name, _ in mlp.named_parameters()) == [
        "down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x = torch.randn(3, H)
    torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    assert SwiGLUMLP(H, 12, bias=True).gate_proj.bias is not None


@pytest.mark.parametrize("implementation", ["loop", "auto"])
def test_jamba_block_weights_load_by_name_and_give_the_same_output(implementation):
    theirs = randomize(JambaSparseMoeBlock(JambaConfig(
        hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=2)))
    ours = SparseMoE(H, E, 2, I, norm_topk_prob=False, implementation=implementation)  # Jamba keeps raw top-k probs
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, H)
    out, router_logits = ours(x)
    torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(router_logits, theirs.router(x.reshape(-1, H))[0])


def test_qwen2_moe_block_with_shared_expert_and_gate_loads_after_renaming_the_router():
    config = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                            shared_expert_intermediate_size=12, norm_topk_prob=True)
    theirs = randomize(Qwen2MoeSparseMoeBlock(config))
    ours = SparseMoE(H, E, 2, I, norm_topk_prob=True, shared_expert_intermediate_size=12, shared_expert_gate=True)
    state = {name.replace("gate.weight", "router.weight") if name == "gate.weight" else name: value
             for name, value in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(ours(x)[0], theirs(x), rtol=1e-5, atol=1e-5)


def test_experts_parameters_are_fused_3d_in_transformers_layout():
    experts = MoEExperts(E, H, I)
    assert experts.gate_up_proj.shape == (E, 2 * I, H)
    assert experts.down_proj.shape == (E, H, I)
    # Expert 2 alone with weight 1 is the SwiGLU MLP built from its rows: gate first, then up.
    mlp = SwiGLUMLP(H, I)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(experts.gate_up_proj[2, :I])
        mlp.up_proj.weight.copy_(experts.gate_up_proj[2, I:])
        mlp.down_proj.weight.copy_(experts.down_proj[2])
    x = torch.randn(5, H)
    out = experts(x, torch.full((5, 1), 2), torch.ones(5, 1))
    torch.testing.assert_close(out, mlp(x))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_scores_top_k_and_renormalisation(scoring):
    k = 2
    x = torch.randn(3, 7, H)
    renormalised = TopKRouter(H, E, k, scoring=scoring, norm_topk_prob=True)
    raw = TopKRouter(H, E, k, scoring=scoring, norm_topk_prob=False)
    raw.load_state_dict(renormalised.state_dict())
    logits, weights, indices = raw(x)
    assert logits.shape == (21, E) and weights.shape == indices.shape == (21, k)
    torch.testing.assert_close(logits, x.reshape(-1, H) @ raw.weight.T)
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    expected_weights, expected_indices = scores.topk(k, dim=-1)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(indices, logits.topk(k, dim=-1).indices)  # both scorings rank experts like the logits
    torch.testing.assert_close(weights, expected_weights)
    assert not torch.allclose(weights.sum(-1), torch.ones(21), atol=1e-3)
    _, normed, normed_indices = renormalised(x)
    assert torch.equal(normed_indices, indices)
    torch.testing.assert_close(normed.sum(-1), torch.ones(21))
    torch.testing.assert_close(normed, weights / weights.sum(-1, keepdim=True))


def test_softmax_and_sigmoid_scorings_give_different_weights():
    x = torch.randn(6, H)
    softmax = TopKRouter(H, E, 2, scoring="softmax", norm_topk_prob=False)
    sigmoid = TopKRouter(H, E, 2, scoring="sigmoid", norm_topk_prob=False)
    sigmoid.load_state_dict(softmax.state_dict())
    assert not torch.allclose(softmax(x)[1], sigmoid(x)[1])


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_adds_to_the_routed_output(gated):
    moe = SparseMoE(H, E, 2, I, shared_expert_intermediate_size=12, shared_expert_gate=gated)
    x = torch.randn(2, 3, H)
    out, router_logits = moe(x)
    tokens = x.reshape(-1, H)
    _, weights, indices = moe.router(tokens)
    routed = moe.experts(tokens, indices, weights)
    shared = moe.shared_expert(tokens)
    if gated:
        shared = torch.sigmoid(moe.shared_expert_gate(tokens)) * shared
    torch.testing.assert_close(out, (routed + shared).reshape(2, 3, H))
    assert router_logits.shape == (6, E)
    assert (moe.shared_expert_gate is not None) == gated


@pytest.mark.parametrize("shared_size", [0, None])
def test_without_shared_expert_the_output_is_the_routed_experts(shared_size):
    moe = SparseMoE(H, E, 2, I, shared_expert_intermediate_size=shared_size)
    assert moe.shared_expert is None and moe.shared_expert_gate is None
    assert not any(name.startswith("shared") for name, _ in moe.named_parameters())
    x = torch.randn(2, 3, H)
    _, weights, indices = moe.router(x)
    torch.testing.assert_close(moe(x)[0], moe.experts(x.reshape(-1, H), indices, weights).reshape(2, 3, H))


def test_every_parameter_gets_a_gradient_through_the_routing_weights():
    moe = SparseMoE(H, E, 2, I, shared_expert_intermediate_size=12, shared_expert_gate=True)
    out, _ = moe(torch.randn(4, 8, H))
    out.square().sum().backward()
    for name, param in moe.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(num_experts=0), "num_experts"),
        (dict(hidden_size=-1), "hidden_size"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(scoring="relu"), "scoring"),
        (dict(implementation="sparse"), "implementation"),
        (dict(shared_expert_intermediate_size=-3), "shared_expert_intermediate_size"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    args = {**dict(hidden_size=H, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=I), **kwargs}
    with pytest.raises(ValueError, match=name):
        SparseMoE(**args)


def test_wrong_hidden_size_raises():
    with pytest.raises(ValueError, match="hidden_states"):
        SparseMoE(H, E, 2, I)(torch.randn(2, 3, H + 1))


def test_load_balancing_loss_by_hand():
    # Probabilities (3/4, 1/4), (1/4, 3/4), (3/4, 1/4); top-1 experts 0, 1, 0.
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [math.log(3), 0.0]])
    # f = (2/3, 1/3), P = (1.75/3, 1.25/3): 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 19/18.
    torch.testing.assert_close(load_balancing_loss(logits, 2, 1), torch.tensor(19 / 18))
    # Without the third token: f = P = (1/2, 1/2), 2 * (1/4 + 1/4) = 1.
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(load_balancing_loss(logits, 2, 1, attention_mask=mask), torch.tensor(1.0))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    batch, seqlen, layers, k = 3, 5, 2, 2
    per_layer = tuple(torch.randn(batch * seqlen, E) for _ in range(layers))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]) if masked else None
    expected = load_balancing_loss_func(per_layer, E, k, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(per_layer, E, k, attention_mask=mask), expected)
    single = load_balancing_loss_func(per_layer[:1], E, k, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(per_layer[0], E, k, attention_mask=mask), single)


def test_masked_tokens_are_left_out_of_both_losses():
    logits = torch.randn(2 * 6, E)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    kept = logits[mask.reshape(-1).bool()]
    garbage = logits.clone()
    garbage[~mask.reshape(-1).bool()] = 100.0 * torch.randn(3, E)
    for logits_in in (logits, garbage):
        torch.testing.assert_close(load_balancing_loss(logits_in, E, 2, mask), load_balancing_loss(kept, E, 2))
        torch.testing.assert_close(router_z_loss(logits_in, mask), router_z_loss(kept))


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: log 2, log 4
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2) ** 2))
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([1, 0])), torch.tensor(math.log(2) ** 2))
    torch.testing.assert_close(router_z_loss((logits, logits)), router_z_loss(logits))


def test_losses_check_their_arguments():
    logits = torch.randn(6, E)
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(logits, E + 1, 2)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(logits, E, E + 1)
    with pytest.raises(ValueError, match="attention_mask"):
        router_z_loss(logits, torch.ones(2, 4))
    with pytest.raises(ValueError, match="router_logits"):
        router_z_loss((logits, logits[:3]))


class TinyMoEModel(nn.Module):
    def __init__(self, implementation):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.moe = SparseMoE(H, E, 2, I, shared_expert_intermediate_size=12, implementation=implementation)

    def forward(self, x):
        return self.moe(self.proj(x))[0]


@pytest.mark.parametrize("implementation", ["loop", "auto"])
def test_lora_on_the_fused_expert_weights(implementation):
    from peft import LoraConfig, get_peft_model

    model = TinyMoEModel(implementation)
    x = torch.randn(2, 5, H)
    base_out = model(x).detach()
    peft_model = get_peft_model(model, LoraConfig(
        r=2, lora_alpha=2, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    lora = {name: param for name, param in peft_model.named_parameters() if "lora_" in name}
    assert len(lora) == 4  # A and B for each of the two expert weights
    assert {name for name, param in peft_model.named_parameters() if param.requires_grad} == set(lora)
    torch.testing.assert_close(peft_model(x), base_out)  # LoRA B starts at zero
    with torch.no_grad():
        for name, param in lora.items():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    out = peft_model(x)
    assert (out - base_out).abs().max() > 1e-3
    out.square().sum().backward()
    for name, param in peft_model.named_parameters():
        if name in lora:
            assert param.grad is not None and param.grad.abs().max() > 0, name
        else:
            assert param.grad is None, name
