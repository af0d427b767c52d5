"""Declarative maps from other Mamba / Mamba-2 checkpoint formats to ssm_hub's, and from ssm_hub's back to
transformers'.

A weight map is a tuple of :class:`WeightRule`: a source key pattern, the target key it becomes, and the shape the
tensor must have as a function of the config; ``{i}`` stands for a layer index and expands over
``range(config.num_hidden_layers)``. :func:`apply_weight_map` checks a whole state dict against a map and raises
one ``ValueError`` that lists every unknown source key, every missing key and every mis-shaped tensor, so a bad
checkpoint is diagnosed in one run and no tensor is ever dropped silently.

A config map is a tuple of :class:`ConfigField`: a field of the source config.json (a dotted path such as
``ssm_cfg.d_state`` for mamba_ssm's nested dict), the target field it becomes (``None``: dropped, with the reason),
the value the source format assumes when the field is absent, and the values the target can express.
:func:`apply_config_map` turns a source config.json into keyword arguments for the target config class.

A :class:`ConversionMap` pairs the two. The maps defined here:

- ``TRANSFORMERS_MAMBA_TO_SSM_HUB`` / ``TRANSFORMERS_MAMBA2_TO_SSM_HUB`` and ``SSM_HUB_MAMBA_TO_TRANSFORMERS`` /
  ``SSM_HUB_MAMBA2_TO_TRANSFORMERS``: transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` use the same
  parameter names as ssm_hub, so their weight maps are identities, still checked key by key and shape by shape.
- ``MAMBA_SSM_MAMBA1_TO_SSM_HUB`` / ``MAMBA_SSM_MAMBA2_TO_SSM_HUB``: mamba_ssm's ``MambaLMHeadModel`` names its
  embedding ``backbone.embedding.weight``, nests the mixer settings in ``ssm_cfg`` and pads the embedding to a
  multiple of ``pad_vocab_size_multiple`` (the padded size becomes ``vocab_size``).
- ``SSM_HUB_MAMBA_TO_SSM_HUB`` / ``SSM_HUB_MAMBA2_TO_SSM_HUB``: identities, to re-save (or re-cast) our own.
- ``JAMBA_TO_SSM_HUB_HYBRID`` / ``SSM_HUB_HYBRID_TO_JAMBA`` and ``BAMBA_TO_SSM_HUB_HYBRID`` /
  ``SSM_HUB_HYBRID_TO_BAMBA``: transformers' JambaForCausalLM (Mamba-1 + attention + MoE) and BambaForCausalLM
  (Mamba-2 + attention with half-rotary RoPE). ssm_hub_hybrid uses their parameter names, so the weights map by
  identity (Jamba's per-expert tensors are fused on the way in); the configs differ in how they state the layout
  (Jamba's periods, Bamba's attention indices, ssm_hub's per-layer lists). ``SSM_HUB_HYBRID_TO_SSM_HUB`` re-saves.
"""

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    MambaConfig,
    PreTrainedConfig,
)

from ssm_hub.models.hybrid.configuration_hybrid import LEGACY_ROPE_FIELDS, ROPE_DEFAULTS, SsmHubHybridConfig
from ssm_hub.models.hybrid.layer_layout import index_layers, period_form
from ssm_hub.models.hybrid.modeling_hybrid import SsmHubHybridForCausalLM
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config


def _always(config) -> bool:
    return True


def _any_value(value) -> bool:
    return True


@dataclass(frozen=True)
class WeightRule:
    """One tensor: where it is in the source, where it goes, and the shape it must have.

    ``present_if`` says whether the config has this tensor at all (a bias only with ``use_bias``); a tensor whose
    condition is false must be absent from the source, else it is reported as unknown. ``tied_to`` names the target
    key this tensor equals when ``config.tie_word_embeddings``: then the source may omit it, and if it has it, it
    must be equal to the tensor it is tied to.
    """

    source: str
    target: str
    shape: Callable[[Any], tuple[int, ...]]
    present_if: Callable[[Any], bool] = _always
    tied_to: str | None = None


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()
"""``ConfigField.default`` for a field that the source format requires (no default)."""


@dataclass(frozen=True)
class ConfigField:
    """One field of a source config.json and what becomes of it.

    ``source`` is a key of the source config.json, dotted for nested dicts (``"ssm_cfg.d_state"``), or ``None`` for a
    value the source format fixes without storing it (then ``default`` is that value). ``target`` is the target
    config's field, or ``None`` when the field is dropped; ``reason`` says why. ``default`` is what the source format
    assumes when the field is absent. ``supported`` accepts the values the target can express; any other value raises
    a ValueError quoting ``reason``.
    """

    source: str | None
    target: str | None
    default: Any = ABSENT
    supported: Callable[[Any], bool] = _any_value
    reason: str = ""


@dataclass(frozen=True)
class SizeFromWeight:
    """A target config field read from a tensor's shape instead of the source config (mamba_ssm's padded vocab)."""

    target: str
    weight: str
    dim: int


@dataclass(frozen=True)
class ConversionMap:
    """Everything needed to turn one checkpoint format into another: config fields and weights.

    ``weights`` is a tuple of rules, or a function of the target config that returns them (a hybrid's tensors
    depend on its layer layout). ``finish`` derives the target fields that no single source field gives (Jamba's
    period form from ssm_hub's per-layer lists, and back): it receives the flattened source config and the target
    keyword arguments built so far, returns the final keyword arguments, and raises ValueError for a layout the
    target cannot express. ``prepare_weights`` turns the source state dict into the tensors the rules name
    before they are checked (Jamba's checkpoints store each expert's projections apart; the rules name the fused
    3-D tensors).
    """

    description: str
    config_fields: tuple[ConfigField, ...]
    weights: tuple[WeightRule, ...] | Callable[[Any], tuple[WeightRule, ...]]
    sizes_from_weights: tuple[SizeFromWeight, ...] = ()
    finish: Callable[[dict, dict], dict] | None = None
    prepare_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def weight_rules(self, config) -> tuple[WeightRule, ...]:
        return self.weights(config) if callable(self.weights) else self.weights

    def prepared(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.prepare_weights(state_dict) if self.prepare_weights is not None else state_dict


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


_EMBEDDINGS = "backbone.embeddings.weight"


def _model_rules(mixer_rules: tuple[WeightRule, ...]) -> tuple[WeightRule, ...]:
    """The parameters around the mixers, identical for Mamba-1 and Mamba-2 in transformers and ssm_hub."""
    return (
        WeightRule(_EMBEDDINGS, _EMBEDDINGS, lambda c: (c.vocab_size, c.hidden_size)),
        WeightRule("backbone.layers.{i}.norm.weight", "backbone.layers.{i}.norm.weight", lambda c: (c.hidden_size,)),
        *mixer_rules,
        WeightRule("backbone.norm_f.weight", "backbone.norm_f.weight", lambda c: (c.hidden_size,)),
        WeightRule("lm_head.weight", "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), tied_to=_EMBEDDINGS),
    )


def _mixer_rule(name: str, shape: Callable, present_if: Callable = _always) -> WeightRule:
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


def with_source_names(rules: tuple[WeightRule, ...], sources: Mapping[str, str]) -> tuple[WeightRule, ...]:
    """``rules`` with the source key of the rules targeting each key of ``sources`` replaced by its value."""
    targets = {rule.target for rule in rules}
    unused = sorted(set(sources) - targets)
    if unused:
        raise ValueError(f"with_source_names: no rule targets {unused}")
    return tuple(replace(rule, source=sources.get(rule.target, rule.source)) for rule in rules)


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

GENERIC_FIELDS = frozenset(PreTrainedConfig().to_dict()) - {
    "_name_or_path", "architectures", "dtype", "model_type", "transformers_version",
}
"""Settings every transformers config has (return_dict, id2label ...): passed through unchanged."""


def _same_fields(names: tuple[str, ...], defaults_from: type, but: tuple[str, ...] = ()) -> tuple[ConfigField, ...]:
    # A field absent from a config.json has the value its config class gives it, so that is the default.
    return tuple(ConfigField(name, name, default=getattr(defaults_from, name)) for name in names if name not in but)


def _dropped(names: tuple[str, ...], reason: str) -> tuple[ConfigField, ...]:
    return tuple(ConfigField(name, None, reason=reason) for name in names)


_REWRITTEN_ON_SAVE = _dropped(
    ("_name_or_path", "architectures", "auto_map", "model_type", "transformers_version"),
    "describes the source checkpoint; save_pretrained writes the target's own",
)
_DTYPE = _dropped(
    ("dtype", "torch_dtype"), "the written tensors set the dtype (convert_checkpoint's dtype argument casts them)"
)
_MAMBA_SSM_LEFTOVERS = _dropped(
    ("fused_add_norm", "rms_norm", "n_layer", "pad_vocab_size_multiple"),
    "left in early '-hf' configs by transformers' conversion from mamba_ssm; transformers ignores it",
)

TRANSFORMERS_MAMBA_TO_SSM_HUB = ConversionMap(
    description="transformers MambaForCausalLM -> ssm_hub_mamba",
    config_fields=(
        *_same_fields(MAMBA_SHARED_FIELDS, MambaConfig),
        *_dropped(("use_mambapy", "use_associative_scan"),
                  "a transformers-only switch between its pure-torch scan implementations; ssm_hub picks its "
                  "implementation with backend= / SSM_HUB_BACKEND"),
        *_dropped(("intermediate_size",), "derived: hidden_size * expand"),
        *_MAMBA_SSM_LEFTOVERS, *_REWRITTEN_ON_SAVE, *_DTYPE,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

TRANSFORMERS_MAMBA2_TO_SSM_HUB = ConversionMap(
    description="transformers Mamba2ForCausalLM -> ssm_hub_mamba2",
    config_fields=(
        *_same_fields(MAMBA2_SHARED_FIELDS, Mamba2Config),
        ConfigField(None, "norm_before_gate", default=False,
                    reason="transformers' Mamba2 always multiplies by the gate before its grouped RMSNorm"),
        *_dropped(("time_step_rank",),
                  "transformers' Mamba2 stores it but has no dt_proj: Mamba-2 has one dt per head"),
        *_dropped(("time_step_init_scheme", "time_step_scale"),
                  "Mamba-1 dt_proj initialisation settings, left in some Mamba-2 configs; Mamba-2 has no dt_proj"),
        *_MAMBA_SSM_LEFTOVERS, *_REWRITTEN_ON_SAVE, *_DTYPE,
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
        *_same_fields(MAMBA_SHARED_FIELDS, SsmHubMambaConfig, but=("rescale_prenorm_residual",)),
        *_NO_RESCALE_ON_LOAD,
        ConfigField("inner_layernorms", None, default=False, supported=lambda value: value is False,
                    reason="transformers' MambaForCausalLM has no dt / B / C norms (Jamba's); keep this checkpoint "
                           "in the ssm_hub format"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

SSM_HUB_MAMBA2_TO_TRANSFORMERS = ConversionMap(
    description="ssm_hub_mamba2 -> transformers Mamba2ForCausalLM",
    config_fields=(
        *_same_fields(MAMBA2_SHARED_FIELDS, SsmHubMamba2Config, but=("rescale_prenorm_residual",)),
        *_NO_RESCALE_ON_LOAD,
        ConfigField("norm_before_gate", None, default=False, supported=lambda value: value is False,
                    reason="transformers' Mamba2ForCausalLM always gates before the norm and cannot express "
                           "norm_before_gate=True; keep this checkpoint in the ssm_hub format"),
        *_dropped(("A_init_range",), "only initialises A_log, which the converted weights carry"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    ),
    weights=MAMBA2_IDENTITY_RULES,
)

SSM_HUB_MAMBA_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_mamba -> ssm_hub_mamba",
    config_fields=(
        *_same_fields(MAMBA_SHARED_FIELDS + ("inner_layernorms",), SsmHubMambaConfig), *_REWRITTEN_ON_SAVE, *_DTYPE,
    ),
    weights=MAMBA_IDENTITY_RULES,
)

SSM_HUB_MAMBA2_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_mamba2 -> ssm_hub_mamba2",
    config_fields=(
        *_same_fields(MAMBA2_SHARED_FIELDS + ("norm_before_gate", "A_init_range"), SsmHubMamba2Config),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    ),
    weights=MAMBA2_IDENTITY_RULES,
)

# mamba_ssm's MambaLMHeadModel. Its MambaConfig fields and the mixers' constructor defaults (mamba_ssm 2.x) are the
# defaults below; norm_epsilon is a MixerModel argument that its config.json never stores (always 1e-5).
_HYBRID_REASON = (
    "only pure-SSM mamba_ssm models convert to ssm_hub_mamba / ssm_hub_mamba2; hybrids (attention layers, MLPs after "
    "the mixers, LayerNorm blocks) come with the ssm_hub_hybrid type"
)
_MAMBA_SSM_MODEL_FIELDS = (
    ConfigField("d_model", "hidden_size"),
    ConfigField("n_layer", "num_hidden_layers"),
    ConfigField("vocab_size", None,
                reason="the embedding is padded to pad_vocab_size_multiple: its shape sets vocab_size"),
    ConfigField("pad_vocab_size_multiple", None, reason="the embedding's shape already includes the padding"),
    ConfigField("d_intermediate", None, default=0, supported=lambda value: value == 0, reason=_HYBRID_REASON),
    ConfigField("attn_layer_idx", None, default=[], supported=lambda value: not value, reason=_HYBRID_REASON),
    ConfigField("attn_cfg", None, reason="configures attention layers; with attn_layer_idx empty there are none"),
    ConfigField("rms_norm", None, default=True, supported=lambda value: value is True, reason=_HYBRID_REASON),
    ConfigField("residual_in_fp32", "residual_in_fp32", default=True),
    ConfigField("fused_add_norm", None, default=True, reason="a mamba_ssm kernel switch (fused add + norm); same math"),
    ConfigField("tie_embeddings", "tie_word_embeddings", default=True),
    ConfigField(None, "layer_norm_epsilon", default=1e-5, reason="mamba_ssm's MixerModel norm_epsilon, never stored"),
    ConfigField("ssm_cfg.layer_idx", None, reason="set per layer by mamba_ssm itself"),
)
_MAMBA_SSM_EMBEDDING = {_EMBEDDINGS: "backbone.embedding.weight"}
_VOCAB_FROM_EMBEDDING = (SizeFromWeight("vocab_size", "backbone.embedding.weight", 0),)

MAMBA_SSM_MAMBA1_TO_SSM_HUB = ConversionMap(
    description="mamba_ssm MambaLMHeadModel (Mamba-1) -> ssm_hub_mamba",
    config_fields=(
        *_MAMBA_SSM_MODEL_FIELDS,
        ConfigField("ssm_cfg.layer", None, default="Mamba1", supported=lambda value: value == "Mamba1",
                    reason="selects the mixer class; this map is for Mamba1"),
        ConfigField("ssm_cfg.d_state", "state_size", default=16),
        ConfigField("ssm_cfg.d_conv", "conv_kernel", default=4),
        ConfigField("ssm_cfg.expand", "expand", default=2),
        ConfigField("ssm_cfg.dt_rank", "time_step_rank", default="auto"),
        ConfigField("ssm_cfg.dt_min", "time_step_min", default=0.001),
        ConfigField("ssm_cfg.dt_max", "time_step_max", default=0.1),
        ConfigField("ssm_cfg.dt_init", "time_step_init_scheme", default="random"),
        ConfigField("ssm_cfg.dt_scale", "time_step_scale", default=1.0),
        ConfigField("ssm_cfg.dt_init_floor", "time_step_floor", default=1e-4),
        ConfigField("ssm_cfg.conv_bias", "use_conv_bias", default=True),
        ConfigField("ssm_cfg.bias", "use_bias", default=False),
        ConfigField("ssm_cfg.use_fast_path", None, reason="a mamba_ssm kernel switch (fused CUDA path); same math"),
    ),
    weights=with_source_names(MAMBA_IDENTITY_RULES, _MAMBA_SSM_EMBEDDING),
    sizes_from_weights=_VOCAB_FROM_EMBEDDING,
)

MAMBA_SSM_MAMBA2_TO_SSM_HUB = ConversionMap(
    description="mamba_ssm MambaLMHeadModel (Mamba-2) -> ssm_hub_mamba2",
    config_fields=(
        *_MAMBA_SSM_MODEL_FIELDS,
        ConfigField("ssm_cfg.layer", None, default="Mamba1", supported=lambda value: value == "Mamba2",
                    reason="selects the mixer class; this map is for Mamba2"),
        ConfigField("ssm_cfg.d_state", "state_size", default=128),
        ConfigField("ssm_cfg.d_conv", "conv_kernel", default=4),
        ConfigField("ssm_cfg.expand", "expand", default=2),
        ConfigField("ssm_cfg.headdim", "head_dim", default=64),
        ConfigField("ssm_cfg.ngroups", "n_groups", default=1),
        ConfigField("ssm_cfg.chunk_size", "chunk_size", default=256),
        ConfigField("ssm_cfg.norm_before_gate", "norm_before_gate", default=False),
        ConfigField("ssm_cfg.A_init_range", "A_init_range", default=(1, 16)),
        ConfigField("ssm_cfg.dt_min", "time_step_min", default=0.001),
        ConfigField("ssm_cfg.dt_max", "time_step_max", default=0.1),
        ConfigField("ssm_cfg.dt_init_floor", "time_step_floor", default=1e-4),
        ConfigField("ssm_cfg.dt_limit", "time_step_limit", default=(0.0, float("inf"))),
        ConfigField("ssm_cfg.bias", "use_bias", default=False),
        ConfigField("ssm_cfg.conv_bias", "use_conv_bias", default=True),
        ConfigField("ssm_cfg.d_ssm", None, default=None, supported=lambda value: value is None,
                    reason="d_ssm sends only part of the inner dimension through the SSM (the rest is a gated MLP), "
                           "which ssm_hub_mamba2 cannot express"),
        ConfigField("ssm_cfg.rmsnorm", None, default=True, supported=lambda value: value is True,
                    reason="ssm_hub_mamba2 always has the gated RMSNorm before out_proj"),
        ConfigField("ssm_cfg.D_has_hdim", None, default=False, supported=lambda value: value is False,
                    reason="ssm_hub_mamba2 has one D per head, not one per channel"),
        ConfigField("ssm_cfg.conv_init", None, reason="initialisation only; the weights are given"),
        ConfigField("ssm_cfg.use_mem_eff_path", None, reason="a mamba_ssm kernel switch (fused CUDA path); same math"),
        ConfigField("ssm_cfg.process_group", None, default=None, supported=lambda value: value is None,
                    reason="tensor-parallel checkpoints hold one shard per rank; merge them first"),
        ConfigField("ssm_cfg.sequence_parallel", None, reason="a tensor-parallel training switch"),
    ),
    weights=with_source_names(MAMBA2_IDENTITY_RULES, _MAMBA_SSM_EMBEDDING),
    sizes_from_weights=_VOCAB_FROM_EMBEDDING,
)


def apply_config_map(
    source_config: Mapping[str, Any],
    conversion_map: ConversionMap,
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the target config class, from a source config.json loaded as a dict.

    ``weight_shapes`` (source key -> shape) supplies the fields in ``conversion_map.sizes_from_weights``. Raises one
    ValueError listing every missing required field and every value the target cannot express. Fields that the map
    does not know are ignored with a warning that names them.
    """
    nested = {field.source.split(".", 1)[0]
              for field in conversion_map.config_fields if field.source and "." in field.source}
    flat = _flatten(source_config, nested)
    target_kwargs: dict[str, Any] = {}
    problems = []
    known = set()
    for field in conversion_map.config_fields:
        if field.source is None:
            value = field.default
        elif field.source in flat:
            known.add(field.source)
            value = flat[field.source]
        elif field.default is ABSENT:
            if field.target is not None:
                problems.append(f"{field.source}: required (becomes {field.target}) but absent")
            continue
        else:
            value = field.default
        if not field.supported(value):
            problems.append(f"{field.source} = {value!r} is not supported: {field.reason}")
        elif field.target is not None:
            target_kwargs[field.target] = value
    if not problems and conversion_map.finish is not None:
        try:
            target_kwargs = conversion_map.finish(flat, dict(target_kwargs))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError(
            f"cannot convert the config ({conversion_map.description}):\n  " + "\n  ".join(problems)
        )
    for size in conversion_map.sizes_from_weights:
        if weight_shapes is not None and size.weight in weight_shapes:
            target_kwargs[size.target] = weight_shapes[size.weight][size.dim]
    for name in GENERIC_FIELDS & flat.keys():
        target_kwargs[name] = flat[name]
        known.add(name)
    ignored = sorted(set(flat) - known - nested)
    if ignored:
        warnings.warn(
            f"{conversion_map.description}: ignoring config fields that this conversion does not know: {ignored}",
            stacklevel=2,
        )
    return target_kwargs


def _flatten(config: Mapping[str, Any], nested: set[str]) -> dict[str, Any]:
    flat = dict(config)
    for name in nested:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"config field {name} must be a JSON object, got {value!r}")
        flat.update({f"{name}.{key}": item for key, item in value.items()})
    return flat


@dataclass(frozen=True)
class _ExpectedTensor:
    source: str
    target: str
    shape: tuple[int, ...]
    tied_to: str | None


def apply_weight_map(
    state_dict: Mapping[str, torch.Tensor], rules: tuple[WeightRule, ...], config
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``rules``, checking every key and shape against ``config``.

    ``config`` has transformers' field names (hidden_size, num_hidden_layers ...). Returns a dict holding every
    target key; a tied tensor that the source omitted is filled with the tensor it is tied to, so the result loads
    into the target model with ``strict=True``. Raises one ValueError listing every unknown source key, every
    missing key, every mis-shaped tensor and every tied tensor that differs from its partner.
    """
    expected = _expand(rules, config)
    tied = config.tie_word_embeddings
    converted: dict[str, torch.Tensor] = {}
    missing: list[_ExpectedTensor] = []
    misshaped: list[tuple[_ExpectedTensor, tuple[int, ...]]] = []
    for tensor_spec in expected:
        tensor = state_dict.get(tensor_spec.source)
        if tensor is None:
            if not (tied and tensor_spec.tied_to):
                missing.append(tensor_spec)
        elif tuple(tensor.shape) != tensor_spec.shape:
            misshaped.append((tensor_spec, tuple(tensor.shape)))
        else:
            converted[tensor_spec.target] = tensor
    differing_ties = []
    for tensor_spec in expected:
        if not (tied and tensor_spec.tied_to) or tensor_spec.tied_to not in converted:
            continue
        partner = converted[tensor_spec.tied_to]
        own = converted.get(tensor_spec.target)
        if own is not None and not torch.equal(own.to(partner.dtype), partner):
            differing_ties.append(
                f"{tensor_spec.source} differs from the tensor it is tied to ({tensor_spec.tied_to}) although "
                f"tie_word_embeddings is true: untie the config or drop the tensor"
            )
        converted[tensor_spec.target] = partner
    unknown = sorted(set(state_dict) - {tensor_spec.source for tensor_spec in expected})

    problems = []
    if unknown:
        problems.append("unknown source keys (no rule maps them):")
        problems += [f"  {line}" for line in _collapse_layers(unknown)]
    if missing:
        problems.append("missing keys:")
        problems += [f"  {line}" for line in _collapse_layers(_describe_key(spec) for spec in missing)]
    if misshaped:
        problems.append("mis-shaped tensors:")
        problems += [f"  {line}" for line in _collapse_layers(
            f"{spec.source}: expected shape {list(spec.shape)}, got {list(got)}" for spec, got in misshaped
        )]
    if differing_ties:
        problems.append("tied tensors that differ:")
        problems += [f"  {line}" for line in differing_ties]
    if problems:
        raise ValueError("the checkpoint does not match the weight map:\n" + "\n".join(problems))
    return converted


def _expand(rules: tuple[WeightRule, ...], config) -> list[_ExpectedTensor]:
    expected = []
    for rule in rules:
        if ("{i}" in rule.source) != ("{i}" in rule.target):
            raise ValueError(f"WeightRule {rule.source} -> {rule.target}: '{{i}}' must be in both patterns or neither")
        if not rule.present_if(config):
            continue
        shape = tuple(rule.shape(config))
        layers = range(config.num_hidden_layers) if "{i}" in rule.source else [None]
        for layer in layers:
            expected.append(_ExpectedTensor(
                rule.source.replace("{i}", str(layer)), rule.target.replace("{i}", str(layer)), shape, rule.tied_to
            ))
    return expected


def _describe_key(spec: _ExpectedTensor) -> str:
    return spec.source if spec.source == spec.target else f"{spec.source} (becomes {spec.target})"


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _collapse_layers(lines) -> list[str]:
    """Merge lines that differ only in a layer index into ``x.layers.{i}.y (layers 0-23)``, in first-seen order."""
    layers_by_pattern: dict[str, list[int]] = {}
    for line in lines:
        match = _LAYER_INDEX.search(line)
        if match is None:
            layers_by_pattern.setdefault(line, [])
        else:
            pattern = line[:match.start()] + ".layers.{i}." + line[match.end():]
            layers_by_pattern.setdefault(pattern, []).append(int(match.group(1)))
    return [pattern.replace("{i}", str(layers[0])) if len(layers) == 1
            else pattern if not layers else f"{pattern} (layers {_ranges(sorted(set(layers)))})"
            for pattern, layers in layers_by_pattern.items()]


def _ranges(numbers: list[int]) -> str:
    spans = []
    start = previous = numbers[0]
    for number in numbers[1:] + [None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(spans)


# Hybrids. ssm_hub_hybrid names its modules as transformers' Jamba does (model.embed_tokens, input_layernorm, mamba /
# self_attn, pre_ff_layernorm, feed_forward with router / experts, final_layernorm), so a Jamba checkpoint maps by
# identity. The rules are read off the target model class built on the meta device for the target config, which
# checks every key and shape against the layer layout.

_HYBRID_EMBEDDINGS = "model.embed_tokens.weight"


def identity_rules(model_class: type) -> Callable[[Any], tuple[WeightRule, ...]]:
    """Rules keeping every tensor of ``model_class(config)`` under its own name and shape (lm_head tied to the
    embeddings when the config ties them)."""

    def rules(config) -> tuple[WeightRule, ...]:
        with torch.device("meta"):
            model = model_class(config)
        return tuple(
            WeightRule(name, name, lambda c, shape=tuple(tensor.shape): shape,
                       tied_to=_HYBRID_EMBEDDINGS if name == "lm_head.weight" else None)
            for name, tensor in model.state_dict().items()
        )

    return rules


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

_JAMBA_KERNEL_SWITCHES = _dropped(
    ("use_mamba_kernels", "use_mambapy", "use_associative_scan"),
    "a transformers switch between implementations of the same math; ssm_hub picks its own with backend=",
)


def _is(expected):
    return lambda value: value == expected


def _cannot(name: str, expected, reason: str) -> ConfigField:
    """A source field the target can hold only at ``expected``: dropped then, an error naming ``reason`` else."""
    return ConfigField(name, None, default=expected, supported=_is(expected), reason=reason)


def _llama_block_only(target: str) -> tuple[ConfigField, ...]:
    """The hybrid's GPT-2 block options, which a Llama-style target cannot hold."""
    return (
        _cannot("mlp_type", "swiglu", f"{target}'s MLPs are SwiGLU"),
        _cannot("norm_type", "rms", f"{target}'s norms are RMSNorms"),
        _cannot("absolute_position_embeddings", False, f"{target} has no absolute position embeddings"),
        _cannot("attention_qk_norm", False, f"{target}'s attention has no query / key norms"),
    )


def _jamba_to_ssm_hub_fields() -> tuple[ConfigField, ...]:
    return (
        *_same_fields(_JAMBA_SHARED_FIELDS, JambaConfig),
        *_same_fields(("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"),
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
        *_JAMBA_KERNEL_SWITCHES, *_REWRITTEN_ON_SAVE, *_DTYPE,
    )


def _ssm_hub_to_jamba_fields() -> tuple[ConfigField, ...]:
    return (
        *_same_fields(_JAMBA_SHARED_FIELDS, SsmHubHybridConfig),
        ConfigField("layer_norm_epsilon", "rms_norm_eps", default=SsmHubHybridConfig.layer_norm_epsilon),
        ConfigField("head_dim", "head_dim", default=None),
        *_dropped(("mixer_types", "ffn_types"), "become Jamba's attn_layer_* and expert_layer_* period form"),
        *_dropped(("ssm_type", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
                   "expert_layer_offset"), "the per-layer lists are the layout; the period form is derived from them"),
        _cannot("use_rope", False, "Jamba's attention has no positional encoding"),
        _cannot("mamba_inner_layernorms", True, "Jamba's Mamba layers always normalise dt, B and C"),
        _cannot("residual_in_fp32", False, "Jamba adds the residuals in the model's dtype"),
        _cannot("attention_bias", False, "Jamba's attention projections have no bias"),
        _cannot("router_scoring", "softmax", "Jamba's router takes the top-k of a softmax"),
        _cannot("norm_topk_prob", False, "Jamba does not renormalise the top-k weights"),
        _cannot("shared_expert_intermediate_size", None, "Jamba has no shared expert"),
        _cannot("router_z_loss_coef", 0.0, "Jamba has no router z-loss"),
        ConfigField("moe_intermediate_size", None, default=None, supported=lambda value: value is None,
                    reason="Jamba's experts have intermediate_size; set moe_intermediate_size to None"),
        *_dropped(("shared_expert_gate",), "only used with a shared expert, which the check above excludes"),
        *_dropped(("sliding_window",), "used only by sliding_attention layers, which Jamba cannot hold"),
        *_dropped(("rope_parameters",), "no positional encoding (use_rope is false)"),
        _cannot("mlp_bias", False, "Jamba's MLPs have no bias"),
        *_llama_block_only("Jamba"),
        *_dropped(("pkm_num_keys", "pkm_heads", "pkm_key_dim", "pkm_topk"),
                  "used only by pkm feed-forwards, which Jamba cannot hold"),
        *_dropped(("mamba_d_head", "mamba_n_heads", "mamba_n_groups", "mamba_chunk_size", "time_step_limit"),
                  "Mamba-2 settings; Jamba's SSM layers are Mamba-1"),
        *_dropped(("time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual"),
                  "initialisation only; the weights are given"),
        ConfigField(None, "use_mamba_kernels", default=JambaConfig.use_mamba_kernels,
                    reason="transformers' own switch; kept at its default"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    )


def _ssm_hub_hybrid_fields() -> tuple[ConfigField, ...]:
    names = tuple(name for name in SsmHubHybridConfig.__annotations__ if name not in ("mixer_types", "ffn_types"))
    return (
        *_same_fields(names, SsmHubHybridConfig),
        ConfigField("mixer_types", "mixer_types"), ConfigField("ffn_types", "ffn_types"),
        *_dropped(LEGACY_ROPE_FIELDS, "a config saved before rope_parameters: passed on by _legacy_rope_fields"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    )


def _legacy_rope_fields(source: dict, target: dict) -> dict:
    """An ssm_hub_hybrid config.json saved before rope_parameters holds rope_theta / partial_rotary_factor at the
    top level; passed only when present (the config folds them into rope_parameters and refuses a disagreement)."""
    target.update({name: source[name] for name in LEGACY_ROPE_FIELDS if name in source})
    return target


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

SSM_HUB_HYBRID_TO_SSM_HUB = ConversionMap(
    description="ssm_hub_hybrid -> ssm_hub_hybrid",
    config_fields=_ssm_hub_hybrid_fields(),
    weights=identity_rules(SsmHubHybridForCausalLM),
    finish=_legacy_rope_fields,
)


# transformers' BambaForCausalLM: Mamba-2 layers and full-attention layers (RoPE on half of each head's channels),
# each followed by a SwiGLU MLP; the attention layers are listed in attn_layer_indices.

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
        *_same_fields(_BAMBA_SHARED_FIELDS, BambaConfig),
        ConfigField("rms_norm_eps", "layer_norm_epsilon", default=BambaConfig.rms_norm_eps),
        ConfigField("attn_layer_indices", None, default=None, reason="becomes mixer_types"),
        ConfigField("rope_parameters.rope_type", None, default="default", supported=_is("default"),
                    reason="ssm_hub's attention has the default RoPE only"),
        ConfigField("rope_parameters.rope_theta", "rope_theta", default=10000.0),
        ConfigField("rope_parameters.partial_rotary_factor", "partial_rotary_factor",
                    default=BAMBA_PARTIAL_ROTARY_FACTOR),
        ConfigField("head_dim", "head_dim", default=None),
        ConfigField(None, "ssm_type", default="mamba2", reason="Bamba's SSM layers are Mamba-2"),
        ConfigField(None, "residual_in_fp32", default=False, reason="Bamba adds the residuals in the model's dtype"),
        *_dropped(("num_logits_to_keep",), "a generation default; generate passes logits_to_keep itself"),
        *_dropped(("z_loss_coefficient",), "BambaForCausalLM never reads it (it has no experts)"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
    )


def _ssm_hub_to_bamba_fields() -> tuple[ConfigField, ...]:
    return (
        *_same_fields(_BAMBA_SHARED_FIELDS, SsmHubHybridConfig),
        ConfigField("layer_norm_epsilon", "rms_norm_eps", default=SsmHubHybridConfig.layer_norm_epsilon),
        ConfigField("head_dim", "head_dim", default=None),
        *_dropped(("mixer_types", "ffn_types"), "become Bamba's attn_layer_indices (every layer has an MLP)"),
        *_dropped(("ssm_type", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
                   "expert_layer_offset"), "the per-layer lists are the layout"),
        ConfigField("rope_parameters.rope_theta", None, reason="becomes Bamba's rope_parameters"),
        _cannot("rope_parameters.rope_type", "default", "Bamba's attention has the default RoPE"),
        _cannot("use_rope", True, "Bamba's attention always applies RoPE"),
        _cannot("rope_parameters.partial_rotary_factor", BAMBA_PARTIAL_ROTARY_FACTOR,
               "BambaConfig rotates half of each head's channels whatever it is given"),
        _cannot("residual_in_fp32", False, "Bamba adds the residuals in the model's dtype"),
        *_llama_block_only("Bamba"),
        *_dropped(("sliding_window",), "used only by sliding_attention layers, which Bamba cannot hold"),
        *_dropped(("num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_scoring",
                   "norm_topk_prob", "shared_expert_intermediate_size", "shared_expert_gate", "router_aux_loss_coef",
                   "router_z_loss_coef", "output_router_logits"),
                  "mixture-of-experts settings; Bamba's feed-forwards are MLPs (checked on ffn_types)"),
        *_dropped(("pkm_num_keys", "pkm_heads", "pkm_key_dim", "pkm_topk"),
                  "used only by pkm feed-forwards, which Bamba cannot hold"),
        *_dropped(("mamba_dt_rank", "mamba_inner_layernorms"), "Mamba-1 settings; Bamba's SSM layers are Mamba-2"),
        *_dropped(("time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual"),
                  "initialisation only; the weights are given"),
        *_REWRITTEN_ON_SAVE, *_DTYPE,
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
