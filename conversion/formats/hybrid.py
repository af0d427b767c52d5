"""What the hybrid families share, and ssm_hub_hybrid's map onto itself (to re-save or re-cast).

ssm_hub_hybrid names its modules as transformers' Jamba does (model.embed_tokens, input_layernorm, mamba / self_attn,
pre_ff_layernorm, feed_forward with router / experts, final_layernorm), so hybrid checkpoints map by identity
(:func:`identity_rules`); the configs differ in how they state the layout (see ``jamba`` and ``bamba``).
"""

from collections.abc import Callable
from typing import Any

import torch

from ssm_hub.conversion.formats.engine import (
    DTYPE_FIELDS,
    REWRITTEN_ON_SAVE,
    ConfigField,
    ConversionMap,
    WeightRule,
    dropped,
    only_at,
    same_fields,
)
from ssm_hub.models.hybrid.configuration_hybrid import LEGACY_ROPE_FIELDS, SsmHubHybridConfig
from ssm_hub.models.hybrid.modeling_hybrid import SsmHubHybridForCausalLM

HYBRID_EMBEDDINGS = "model.embed_tokens.weight"


def identity_rules(model_class: type) -> Callable[[Any], tuple[WeightRule, ...]]:
    """Rules keeping every tensor of ``model_class(config)`` under its own name and shape (lm_head tied to the
    embeddings when the config ties them)."""

    def rules(config) -> tuple[WeightRule, ...]:
        with torch.device("meta"):
            model = model_class(config)
        return tuple(
            WeightRule(name, name, lambda c, shape=tuple(tensor.shape): shape,
                       tied_to=HYBRID_EMBEDDINGS if name == "lm_head.weight" else None)
            for name, tensor in model.state_dict().items()
        )

    return rules


def llama_block_only(target: str) -> tuple[ConfigField, ...]:
    """The hybrid's GPT-2 block options, which a Llama-style target cannot hold."""
    return (
        only_at("mlp_type", "swiglu", f"{target}'s MLPs are SwiGLU"),
        only_at("norm_type", "rms", f"{target}'s norms are RMSNorms"),
        only_at("absolute_position_embeddings", False, f"{target} has no absolute position embeddings"),
        only_at("attention_qk_norm", False, f"{target}'s attention has no query / key norms"),
    )


def _ssm_hub_hybrid_fields() -> tuple[ConfigField, ...]:
    names = tuple(name for name in SsmHubHybridConfig.__annotations__ if name not in ("mixer_types", "ffn_types"))
    return (
        *same_fields(names, SsmHubHybridConfig),
        ConfigField("mixer_types", "mixer_types"), ConfigField("ffn_types", "ffn_types"),
        *dropped(LEGACY_ROPE_FIELDS, "a config saved before rope_parameters: passed on by _legacy_rope_fields"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    )


def _legacy_rope_fields(source: dict, target: dict) -> dict:
    """An ssm_hub_hybrid config.json saved before rope_parameters holds rope_theta / partial_rotary_factor at the
    top level; passed only when present (the config folds them into rope_parameters and refuses a disagreement)."""
    target.update({name: source[name] for name in LEGACY_ROPE_FIELDS if name in source})
    return target


SSM_HUB_HYBRID_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_hybrid -> ssm_hub_hybrid",
    config_fields=_ssm_hub_hybrid_fields(),
    weights=identity_rules(SsmHubHybridForCausalLM),
    finish=_legacy_rope_fields,
)
