"""Conversion maps between transformers' JambaForCausalLM (Mamba-1 + attention + MoE) and ssm_hub_hybrid, both
ways. The weights map by identity (see hybrid), Jamba's per-expert tensors fused on the way in; the layout goes
between Jamba's period form and ssm_hub's per-layer lists (ssm_hub.models.hybrid.layer_layout)."""

import re

import torch
from transformers import JambaConfig, JambaForCausalLM

from ssm_hub.conversion.formats.engine import (
    DTYPE_FIELDS,
    REWRITTEN_ON_SAVE,
    ConfigField,
    ConversionMap,
    dropped,
    only_at,
    same_fields,
)
from ssm_hub.conversion.formats.hybrid import identity_rules, llama_block_only
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.hybrid.layer_layout import period_form
from ssm_hub.models.hybrid.modeling_hybrid import SsmHubHybridForCausalLM

def _jamba_period(kinds: list[str], special: str, name: str, other: str) -> tuple[int, int]:
    """(period, offset) putting ``special`` exactly where ``kinds`` has it (see layer_layout.period_form)."""
    form = period_form([kind == special for kind in kinds])
    if form is None:
        raise ValueError(f"{name} = {kinds} has no period form (Jamba puts {special} layers wherever layer % period "
                         f"== offset and {other} layers elsewhere)")
    return form


def _jamba_layout_from_lists(source: dict, target: dict) -> dict:
    mixers, ffns = source["mixer_types"], source["ffn_types"]
    for name, kinds, allowed in (("mixer_types", mixers, ("mamba", "attention")), ("ffn_types", ffns, ("mlp", "moe"))):
        unsupported = sorted(set(kinds) - set(allowed))
        if unsupported:
            raise ValueError(f"{name} holds {unsupported}: Jamba's layers are {allowed} only")
    attn_period, attn_offset = _jamba_period(mixers, "attention", "mixer_types", "Mamba-1")
    expert_period, expert_offset = _jamba_period(ffns, "moe", "ffn_types", "MLP")
    target.update(attn_layer_period=attn_period, attn_layer_offset=attn_offset,
                  expert_layer_period=expert_period, expert_layer_offset=expert_offset)
    if "moe" not in ffns:  # Jamba's "no MoE" is one expert per layer, an MLP
        target.update(num_experts=1, num_experts_per_tok=1)
    if target.get("head_dim") is None:  # Jamba reads head_dim only if the config has it, else hidden / heads
        target.pop("head_dim", None)
    return target


def _lists_from_jamba_layout(source: dict, target: dict) -> dict:
    if target["num_experts"] <= 1:  # one expert: every feed-forward is Jamba's MLP, whatever the expert period
        del target["expert_layer_period"], target["expert_layer_offset"]
        target.update(ffn_types=["mlp"] * target["num_hidden_layers"], num_experts_per_tok=1)
    return target


_JAMBA_SHARED_FIELDS = (
    "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "initializer_range", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "pad_token_id", "bos_token_id", "eos_token_id",
    "max_position_embeddings", "attention_dropout", "num_experts_per_tok", "num_experts", "mamba_d_state",
    "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias",
)
"""Fields that transformers' JambaConfig and SsmHubHybridConfig both have, with the same meaning."""

_JAMBA_KERNEL_SWITCHES = dropped(
    ("use_mamba_kernels", "use_mambapy", "use_associative_scan"),
    "a transformers switch between implementations of the same math; ssm_hub picks its own with backend=",
)


def _jamba_to_ssm_hub_fields() -> tuple[ConfigField, ...]:
    return (
        *same_fields(_JAMBA_SHARED_FIELDS, JambaConfig),
        *same_fields(("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"),
                      JambaConfig),
        ConfigField("rms_norm_eps", "layer_norm_epsilon", default=JambaConfig.rms_norm_eps),
        ConfigField("head_dim", "head_dim", default=None),
        ConfigField(None, "ssm_type", default="mamba", reason="Jamba's SSM layers are Mamba-1"),
        ConfigField(None, "mamba_inner_layernorms", default=True,
                    reason="Jamba's Mamba layers always normalise dt, B and C"),
        ConfigField(None, "use_rope", default=False, reason="Jamba's attention has no positional encoding"),
        ConfigField(None, "residual_in_fp32", default=False, reason="Jamba adds the residuals in the model's dtype"),
        ConfigField(None, "router_scoring", default="softmax", reason="Jamba's router: softmax, then top-k"),
        ConfigField(None, "norm_topk_prob", default=False, reason="Jamba does not renormalise the top-k weights"),
        *_JAMBA_KERNEL_SWITCHES, *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    )


def _ssm_hub_to_jamba_fields() -> tuple[ConfigField, ...]:
    return (
        *same_fields(_JAMBA_SHARED_FIELDS, SsmHubHybridConfig),
        ConfigField("layer_norm_epsilon", "rms_norm_eps", default=SsmHubHybridConfig.layer_norm_epsilon),
        ConfigField("head_dim", "head_dim", default=None),
        *dropped(("mixer_types", "ffn_types"), "become Jamba's attn_layer_* and expert_layer_* period form"),
        *dropped(("ssm_type", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
                   "expert_layer_offset"), "the per-layer lists are the layout; the period form is derived from them"),
        only_at("use_rope", False, "Jamba's attention has no positional encoding"),
        only_at("mamba_inner_layernorms", True, "Jamba's Mamba layers always normalise dt, B and C"),
        only_at("residual_in_fp32", False, "Jamba adds the residuals in the model's dtype"),
        only_at("attention_bias", False, "Jamba's attention projections have no bias"),
        only_at("router_scoring", "softmax", "Jamba's router takes the top-k of a softmax"),
        only_at("norm_topk_prob", False, "Jamba does not renormalise the top-k weights"),
        only_at("shared_expert_intermediate_size", None, "Jamba has no shared expert"),
        only_at("router_z_loss_coef", 0.0, "Jamba has no router z-loss"),
        ConfigField("moe_intermediate_size", None, default=None, supported=lambda value: value is None,
                    reason="Jamba's experts have intermediate_size; set moe_intermediate_size to None"),
        *dropped(("shared_expert_gate",), "only used with a shared expert, which the check above excludes"),
        *dropped(("sliding_window",), "used only by sliding_attention layers, which Jamba cannot hold"),
        *dropped(("rope_parameters",), "no positional encoding (use_rope is false)"),
        only_at("mlp_bias", False, "Jamba's MLPs have no bias"),
        *llama_block_only("Jamba"),
        *dropped(("pkm_num_keys", "pkm_heads", "pkm_key_dim", "pkm_topk"),
                  "used only by pkm feed-forwards, which Jamba cannot hold"),
        *dropped(("mamba_d_head", "mamba_n_heads", "mamba_n_groups", "mamba_chunk_size", "time_step_limit"),
                  "Mamba-2 settings; Jamba's SSM layers are Mamba-1"),
        *dropped(("time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual"),
                  "initialisation only; the weights are given"),
        ConfigField(None, "use_mamba_kernels", default=JambaConfig.use_mamba_kernels,
                    reason="transformers' own switch; kept at its default"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    )


_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_per_expert_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints of Jamba / Mixtral-style MoE layers store ``experts.{e}.{gate,up,down}_proj.weight``; transformers
    v5 (and ssm_hub) hold them fused: ``experts.gate_up_proj`` [E, 2 I, H] (gate rows, then up rows) and
    ``experts.down_proj`` [E, H, I]. Returns the state dict with every such group fused; a group missing an
    expert's projection is a ValueError naming it."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    fused = {}
    for name, tensor in state_dict.items():
        match = _PER_EXPERT_KEY.match(name)
        if match is None:
            fused[name] = tensor
        else:
            groups.setdefault(match["prefix"], {}).setdefault(match["proj"], {})[int(match["expert"])] = tensor
    for prefix, projections in groups.items():
        experts = sorted(set().union(*(set(by_expert) for by_expert in projections.values())))
        missing = [f"{prefix}.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")
                   for e in range(experts[-1] + 1) if e not in projections.get(proj, {})]
        if missing:
            raise ValueError(f"the per-expert weights of {prefix} are incomplete; missing {missing}")
        count = len(experts)
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([projections["gate_proj"][e], projections["up_proj"][e]]) for e in range(count)]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([projections["down_proj"][e] for e in range(count)])
    return fused


JAMBA_TO_SSM_HUB_HYBRID = ConversionMap(
    description="transformers JambaForCausalLM -> ssm_hub_hybrid",
    config_fields=_jamba_to_ssm_hub_fields(),
    weights=identity_rules(SsmHubHybridForCausalLM),
    finish=_lists_from_jamba_layout,
    prepare_weights=fuse_per_expert_weights,
)

SSM_HUB_HYBRID_TO_JAMBA = ConversionMap(
    description="ssm_hub_hybrid -> transformers JambaForCausalLM",
    config_fields=_ssm_hub_to_jamba_fields(),
    weights=identity_rules(JambaForCausalLM),
    finish=_jamba_layout_from_lists,
)
