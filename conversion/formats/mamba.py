"""Conversion maps of the pure-SSM families whose parameter names are ssm_hub's: transformers' MambaForCausalLM and
Mamba2ForCausalLM, both ways, and ssm_hub_mamba / ssm_hub_mamba2 onto themselves (to re-save or re-cast). Their
weight maps are identities, still checked key by key and shape by shape (see engine)."""

from collections.abc import Callable

from transformers import Mamba2Config, MambaConfig

from ssm_hub.conversion.formats.engine import (
    DTYPE_FIELDS,
    REWRITTEN_ON_SAVE,
    ConfigField,
    ConversionMap,
    WeightRule,
    always,
    dropped,
    same_fields,
)
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config

# Shapes are functions of a config with transformers' field names, on which ssm_hub's and transformers' configs agree.

def _inner(config) -> int:
    return config.hidden_size * config.expand


def _mamba2_conv_channels(config) -> int:
    # The depthwise conv runs over x, B and C together: d_inner + 2 * n_groups * d_state channels.
    return _inner(config) + 2 * config.n_groups * config.state_size


def _mamba2_in_proj_rows(config) -> int:
    # in_proj produces z (d_inner), then x, B, C (the conv channels), then one dt per head, in that order.
    return _inner(config) + _mamba2_conv_channels(config) + config.num_heads


def _uses_bias(config) -> bool:
    return config.use_bias


def _uses_conv_bias(config) -> bool:
    return config.use_conv_bias


def _has_inner_layernorms(config) -> bool:
    return getattr(config, "inner_layernorms", False)  # transformers' MambaConfig has no such field


EMBEDDINGS = "backbone.embeddings.weight"


def _model_rules(mixer_rules: tuple[WeightRule, ...]) -> tuple[WeightRule, ...]:
    """The parameters around the mixers, identical for Mamba-1 and Mamba-2 in transformers and ssm_hub."""
    return (
        WeightRule(EMBEDDINGS, EMBEDDINGS, lambda c: (c.vocab_size, c.hidden_size)),
        WeightRule("backbone.layers.{i}.norm.weight", "backbone.layers.{i}.norm.weight", lambda c: (c.hidden_size,)),
        *mixer_rules,
        WeightRule("backbone.norm_f.weight", "backbone.norm_f.weight", lambda c: (c.hidden_size,)),
        WeightRule("lm_head.weight", "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), tied_to=EMBEDDINGS),
    )


def _mixer_rule(name: str, shape: Callable, present_if: Callable = always) -> WeightRule:
    key = f"backbone.layers.{{i}}.mixer.{name}"
    return WeightRule(key, key, shape, present_if)


MAMBA_IDENTITY_RULES = _model_rules((
    _mixer_rule("in_proj.weight", lambda c: (2 * _inner(c), c.hidden_size)),
    _mixer_rule("in_proj.bias", lambda c: (2 * _inner(c),), _uses_bias),
    _mixer_rule("conv1d.weight", lambda c: (_inner(c), 1, c.conv_kernel)),
    _mixer_rule("conv1d.bias", lambda c: (_inner(c),), _uses_conv_bias),
    _mixer_rule("x_proj.weight", lambda c: (c.time_step_rank + 2 * c.state_size, _inner(c))),
    _mixer_rule("dt_proj.weight", lambda c: (_inner(c), c.time_step_rank)),
    _mixer_rule("dt_proj.bias", lambda c: (_inner(c),)),
    _mixer_rule("A_log", lambda c: (_inner(c), c.state_size)),
    _mixer_rule("D", lambda c: (_inner(c),)),
    _mixer_rule("out_proj.weight", lambda c: (c.hidden_size, _inner(c))),
    _mixer_rule("out_proj.bias", lambda c: (c.hidden_size,), _uses_bias),
    _mixer_rule("dt_layernorm.weight", lambda c: (c.time_step_rank,), _has_inner_layernorms),
    _mixer_rule("b_layernorm.weight", lambda c: (c.state_size,), _has_inner_layernorms),
    _mixer_rule("c_layernorm.weight", lambda c: (c.state_size,), _has_inner_layernorms),
))
"""Mamba-1 parameters, named alike in transformers' MambaForCausalLM and ssm_hub's SsmHubMambaForCausalLM (the
dt / B / C norms only with ssm_hub's ``inner_layernorms``, which transformers' Mamba cannot express)."""

MAMBA2_IDENTITY_RULES = _model_rules((
    _mixer_rule("in_proj.weight", lambda c: (_mamba2_in_proj_rows(c), c.hidden_size)),
    _mixer_rule("in_proj.bias", lambda c: (_mamba2_in_proj_rows(c),), _uses_bias),
    _mixer_rule("conv1d.weight", lambda c: (_mamba2_conv_channels(c), 1, c.conv_kernel)),
    _mixer_rule("conv1d.bias", lambda c: (_mamba2_conv_channels(c),), _uses_conv_bias),
    _mixer_rule("dt_bias", lambda c: (c.num_heads,)),
    _mixer_rule("A_log", lambda c: (c.num_heads,)),
    _mixer_rule("D", lambda c: (c.num_heads,)),
    _mixer_rule("norm.weight", lambda c: (_inner(c),)),
    _mixer_rule("out_proj.weight", lambda c: (c.hidden_size, _inner(c))),
    _mixer_rule("out_proj.bias", lambda c: (c.hidden_size,), _uses_bias),
))
"""Mamba-2 parameters, named alike in transformers' Mamba2ForCausalLM and ssm_hub's SsmHubMamba2ForCausalLM."""


MAMBA_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel", "time_step_rank",
    "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor", "use_bias",
    "use_conv_bias", "hidden_act", "layer_norm_epsilon", "residual_in_fp32", "initializer_range",
    "rescale_prenorm_residual", "use_cache", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)
"""Fields that transformers' MambaConfig and SsmHubMambaConfig both have, with the same meaning."""

MAMBA2_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim", "num_heads", "n_groups",
    "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "hidden_act", "layer_norm_epsilon", "residual_in_fp32",
    "initializer_range", "rescale_prenorm_residual", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_limit", "use_cache", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)
"""Fields that transformers' Mamba2Config and SsmHubMamba2Config both have, with the same meaning."""

MAMBA_SSM_LEFTOVERS = dropped(
    ("fused_add_norm", "rms_norm", "n_layer", "pad_vocab_size_multiple"),
    "left in early '-hf' configs by transformers' conversion from mamba_ssm; transformers ignores it",
)

TRANSFORMERS_MAMBA_TO_SSM_HUB = ConversionMap(
    description="transformers MambaForCausalLM -> ssm_hub_mamba",
    config_fields=(
        *same_fields(MAMBA_SHARED_FIELDS, MambaConfig),
        *dropped(("use_mambapy", "use_associative_scan"),
                  "a transformers-only switch between its pure-torch scan implementations; ssm_hub picks its "
                  "implementation with backend= / SSM_HUB_BACKEND"),
        *dropped(("intermediate_size",), "derived: hidden_size * expand"),
        *MAMBA_SSM_LEFTOVERS, *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

TRANSFORMERS_MAMBA2_TO_SSM_HUB = ConversionMap(
    description="transformers Mamba2ForCausalLM -> ssm_hub_mamba2",
    config_fields=(
        *same_fields(MAMBA2_SHARED_FIELDS, Mamba2Config),
        ConfigField(None, "norm_before_gate", default=False,
                    reason="transformers' Mamba2 always multiplies by the gate before its grouped RMSNorm"),
        *dropped(("time_step_rank",),
                  "transformers' Mamba2 stores it but has no dt_proj: Mamba-2 has one dt per head"),
        *dropped(("time_step_init_scheme", "time_step_scale"),
                  "Mamba-1 dt_proj initialisation settings, left in some Mamba-2 configs; Mamba-2 has no dt_proj"),
        *MAMBA_SSM_LEFTOVERS, *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA2_IDENTITY_RULES,
)

# transformers 5.24's Mamba / Mamba2 _init_weights divides out_proj.weight by sqrt(num_hidden_layers) in place when
# rescale_prenorm_residual is true, and from_pretrained runs it on the loaded weights too: an init-only setting that
# would corrupt the converted model, so transformers checkpoints are written with it false.
_NO_RESCALE_ON_LOAD = (
    ConfigField("rescale_prenorm_residual", None, reason="initialisation only; the weights are given"),
    ConfigField(None, "rescale_prenorm_residual", default=False,
                reason="transformers' from_pretrained would rescale the loaded out_proj weights if it were true"),
)

SSM_HUB_MAMBA_TO_TRANSFORMERS = ConversionMap(
    description="ssm_hub_mamba -> transformers MambaForCausalLM",
    config_fields=(
        *same_fields(MAMBA_SHARED_FIELDS, SsmHubMambaConfig, but=("rescale_prenorm_residual",)),
        *_NO_RESCALE_ON_LOAD,
        ConfigField("inner_layernorms", None, default=False, supported=lambda value: value is False,
                    reason="transformers' MambaForCausalLM has no dt / B / C norms (Jamba's); keep this checkpoint "
                           "in the ssm_hub format"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

SSM_HUB_MAMBA2_TO_TRANSFORMERS = ConversionMap(
    description="ssm_hub_mamba2 -> transformers Mamba2ForCausalLM",
    config_fields=(
        *same_fields(MAMBA2_SHARED_FIELDS, SsmHubMamba2Config, but=("rescale_prenorm_residual",)),
        *_NO_RESCALE_ON_LOAD,
        ConfigField("norm_before_gate", None, default=False, supported=lambda value: value is False,
                    reason="transformers' Mamba2ForCausalLM always gates before the norm and cannot express "
                           "norm_before_gate=True; keep this checkpoint in the ssm_hub format"),
        *dropped(("A_init_range",), "only initialises A_log, which the converted weights carry"),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA2_IDENTITY_RULES,
)

SSM_HUB_MAMBA_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_mamba -> ssm_hub_mamba",
    config_fields=(
        *same_fields(MAMBA_SHARED_FIELDS + ("inner_layernorms",), SsmHubMambaConfig), *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

SSM_HUB_MAMBA2_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_mamba2 -> ssm_hub_mamba2",
    config_fields=(
        *same_fields(MAMBA2_SHARED_FIELDS + ("norm_before_gate", "A_init_range"), SsmHubMamba2Config),
        *REWRITTEN_ON_SAVE, *DTYPE_FIELDS,
    ),
    weights=MAMBA2_IDENTITY_RULES,
)
