"""Conversion maps of mamba_ssm's MambaLMHeadModel checkpoints (Mamba-1 and Mamba-2) into ssm_hub_mamba and
ssm_hub_mamba2. mamba_ssm names its embedding ``backbone.embedding.weight``, nests the mixer settings in ``ssm_cfg``
and pads the embedding to a multiple of ``pad_vocab_size_multiple`` (the padded size becomes ``vocab_size``)."""

from ssm_hub.conversion.formats.engine import ConfigField, ConversionMap, SizeFromWeight, with_source_names
from ssm_hub.conversion.formats.mamba import EMBEDDINGS, MAMBA2_IDENTITY_RULES, MAMBA_IDENTITY_RULES

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
_MAMBA_SSM_EMBEDDING = {EMBEDDINGS: "backbone.embedding.weight"}
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
