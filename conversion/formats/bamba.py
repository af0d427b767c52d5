"""Conversion maps between transformers' BambaForCausalLM (Mamba-2 layers and full-attention layers with RoPE on
half of each head's channels, each followed by a SwiGLU MLP; the attention layers listed in attn_layer_indices) and
ssm_hub_hybrid, both ways. The weights map by identity (see hybrid)."""

from transformers import BambaConfig, BambaForCausalLM

from ssm_hub.conversion.formats.engine import (
    DTYPE_FIELDS,
    REWRITTEN_ON_SAVE,
    ConfigField,
    ConversionMap,
    dropped,
    equals,
    only_at,
    same_fields,
)
from ssm_hub.conversion.formats.hybrid import identity_rules, llama_block_only
from ssm_hub.models.hybrid.configuration_hybrid import ROPE_DEFAULTS, SsmHubHybridConfig
from ssm_hub.models.hybrid.layer_layout import index_layers
from ssm_hub.models.hybrid.modeling_hybrid import SsmHubHybridForCausalLM

_BAMBA_SHARED_FIELDS = (
    "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "initializer_range", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "max_position_embeddings", "attention_dropout", "attention_bias", "mlp_bias",
    "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
    "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit",
)
"""Fields that transformers' BambaConfig and SsmHubHybridConfig both have, with the same meaning."""

BAMBA_PARTIAL_ROTARY_FACTOR = 0.5
"""BambaConfig sets partial_rotary_factor to 0.5 whatever it is given."""


def _lists_from_bamba_layout(source: dict, target: dict) -> dict:
    layers = target["num_hidden_layers"]
    attention = index_layers(source.get("attn_layer_indices") or (), layers, "attn_layer_indices")
    target.update(mixer_types=["attention" if i in attention else "mamba2" for i in range(layers)],
                  ffn_types=["mlp"] * layers)
    return target


def _bamba_layout_from_lists(source: dict, target: dict) -> dict:
    mixers, ffns = source["mixer_types"], source["ffn_types"]
    unsupported = sorted(set(mixers) - {"mamba2", "attention"})
    if unsupported:
        raise ValueError(f"mixer_types holds {unsupported}: Bamba's layers are Mamba-2 or full attention")
    if set(ffns) != {"mlp"}:
        raise ValueError(f"ffn_types = {ffns}: every Bamba layer is followed by an MLP")
    target["attn_layer_indices"] = [i for i, mixer in enumerate(mixers) if mixer == "attention"]
    target["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": source.get("rope_parameters.rope_theta", ROPE_DEFAULTS["rope_theta"])}
    if target.get("head_dim") is None:  # Bamba reads head_dim only if the config has it, else hidden / heads
        target.pop("head_dim", None)
    if target.get("mamba_n_heads") is None:  # ours derives the head count from the head size; Bamba needs it
        target["mamba_n_heads"] = source["mamba_expand"] * source["hidden_size"] // source["mamba_d_head"]
    return target


def _bamba_to_ssm_hub_fields() -> tuple[ConfigField, ...]:
    return (
        *same_fields(_BAMBA_SHARED_FIELDS, BambaConfig),
        ConfigField("rms_norm_eps", "layer_norm_epsilon", default=BambaConfig.rms_norm_eps),
        ConfigField("attn_layer_indices", None, default=None, reason="becomes mixer_types"),
        ConfigField("rope_parameters.rope_type", None, default="default", supported=equals("default"),
                    reason="ssm_hub's attention has the default RoPE only"),
        ConfigField("rope_parameters.rope_theta", "rope_theta", default=10000.0),
        ConfigField("rope_parameters.partial_rotary_factor", "partial_rotary_factor",
                    default=BAMBA_PARTIAL_ROTARY_FACTOR),
        ConfigField("head_dim", "head_dim", default=None),
        ConfigField(None, "ssm_type", default="mamba2", reason="Bamba's SSM layers are Mamba-2"),
        ConfigField(None, "residual_in_fp32", default=False, reason="Bamba adds the residuals in the model's dtype"),
        *dropped(("num_logits_to_keep",), "a generation default; generate passes logits_to_keep itself"),
        *dropped(("z_loss_coefficient",), "BambaForCausalLM never reads it (it has no experts)"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    )


def _ssm_hub_to_bamba_fields() -> tuple[ConfigField, ...]:
    return (
        *same_fields(_BAMBA_SHARED_FIELDS, SsmHubHybridConfig),
        ConfigField("layer_norm_epsilon", "rms_norm_eps", default=SsmHubHybridConfig.layer_norm_epsilon),
        ConfigField("head_dim", "head_dim", default=None),
        *dropped(("mixer_types", "ffn_types"), "become Bamba's attn_layer_indices (every layer has an MLP)"),
        *dropped(("ssm_type", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
                   "expert_layer_offset"), "the per-layer lists are the layout"),
        ConfigField("rope_parameters.rope_theta", None, reason="becomes Bamba's rope_parameters"),
        only_at("rope_parameters.rope_type", "default", "Bamba's attention has the default RoPE"),
        only_at("use_rope", True, "Bamba's attention always applies RoPE"),
        only_at("rope_parameters.partial_rotary_factor", BAMBA_PARTIAL_ROTARY_FACTOR,
               "BambaConfig rotates half of each head's channels whatever it is given"),
        only_at("residual_in_fp32", False, "Bamba adds the residuals in the model's dtype"),
        *llama_block_only("Bamba"),
        *dropped(("sliding_window",), "used only by sliding_attention layers, which Bamba cannot hold"),
        *dropped(("num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_scoring",
                   "norm_topk_prob", "shared_expert_intermediate_size", "shared_expert_gate", "router_aux_loss_coef",
                   "router_z_loss_coef", "output_router_logits"),
                  "mixture-of-experts settings; Bamba's feed-forwards are MLPs (checked on ffn_types)"),
        *dropped(("pkm_num_keys", "pkm_heads", "pkm_key_dim", "pkm_topk"),
                  "used only by pkm feed-forwards, which Bamba cannot hold"),
        *dropped(("mamba_dt_rank", "mamba_inner_layernorms"), "Mamba-1 settings; Bamba's SSM layers are Mamba-2"),
        *dropped(("time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual"),
                  "initialisation only; the weights are given"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    )


BAMBA_TO_SSM_HUB_HYBRID = ConversionMap(
    description="transformers BambaForCausalLM -> ssm_hub_hybrid",
    config_fields=_bamba_to_ssm_hub_fields(),
    weights=identity_rules(SsmHubHybridForCausalLM),
    finish=_lists_from_bamba_layout,
)

SSM_HUB_HYBRID_TO_BAMBA = ConversionMap(
    description="ssm_hub_hybrid -> transformers BambaForCausalLM",
    config_fields=_ssm_hub_to_bamba_fields(),
    weights=identity_rules(BambaForCausalLM),
    finish=_bamba_layout_from_lists,
)
