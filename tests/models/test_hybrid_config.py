"""The hybrid config: its layer layout (explicit lists or Jamba's period form, stored as lists), the mapping onto
transformers' cache layer kinds, the pure-SSM configs of its SSM layers, save/load, and the errors it raises."""

import pytest
from transformers import DynamicCache

from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig


def test_default_layout_is_one_attention_layer_in_eight():
    config = SsmHubHybridConfig()
    assert config.mixer_types == ["mamba2"] * 4 + ["attention"] + ["mamba2"] * 3
    assert config.ffn_types == ["mlp"] * 8
    assert config.layer_types == ["linear_attention"] * 4 + ["full_attention"] + ["linear_attention"] * 3


def test_jamba_period_form_is_stored_as_explicit_lists():
    config = SsmHubHybridConfig(num_hidden_layers=8, attn_layer_period=4, attn_layer_offset=2,
                                expert_layer_period=2, expert_layer_offset=1, ssm_type="mamba")
    assert config.mixer_types == ["mamba", "mamba", "attention", "mamba"] * 2
    assert config.ffn_types == ["mlp", "moe"] * 4
    stored = config.to_dict()
    assert stored["mixer_types"] == config.mixer_types and stored["ffn_types"] == config.ffn_types
    assert stored["attn_layer_period"] is None and stored["expert_layer_offset"] is None
    assert "layer_types" not in stored  # derived from mixer_types, never stored
    assert SsmHubHybridConfig.from_dict(stored).mixer_types == config.mixer_types


def test_save_and_load_keep_the_layout(tmp_path):
    config = SsmHubHybridConfig(num_hidden_layers=4, mixer_types=["mamba2", "sliding_attention", "mamba", "attention"],
                                ffn_types=["moe", "mlp", "none", "moe"], sliding_window=128)
    config.save_pretrained(tmp_path)
    loaded = SsmHubHybridConfig.from_pretrained(tmp_path)
    assert loaded.mixer_types == config.mixer_types and loaded.ffn_types == config.ffn_types
    assert loaded.sliding_window == 128


def test_transformers_cache_builds_one_layer_of_the_right_kind_per_mixer():
    config = SsmHubHybridConfig(num_hidden_layers=4, mixer_types=["mamba2", "attention", "sliding_attention", "mamba"],
                                sliding_window=16)
    assert config.layer_types == ["linear_attention", "full_attention", "sliding_attention", "linear_attention"]
    kinds = [type(layer).__name__ for layer in DynamicCache(config=config).layers]
    assert kinds == ["LinearAttentionLayer", "DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer"]


def test_ssm_layers_get_the_pure_ssm_configs():
    config = SsmHubHybridConfig(hidden_size=256, mamba_d_state=64, mamba_d_head=32, mamba_n_groups=2,
                                mamba_d_conv=3, mamba_chunk_size=128, mamba_dt_rank=8)
    mamba2 = config.ssm_config("mamba2")
    assert (mamba2.hidden_size, mamba2.state_size, mamba2.head_dim, mamba2.num_heads) == (256, 64, 32, 16)
    assert (mamba2.n_groups, mamba2.conv_kernel, mamba2.chunk_size) == (2, 3, 128)
    mamba = config.ssm_config("mamba")
    assert (mamba.hidden_size, mamba.state_size, mamba.time_step_rank, mamba.conv_kernel) == (256, 64, 8, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mixer_types=["mamba2"] * 8, attn_layer_period=4), "either mixer_types or attn_layer_period"),
        (dict(ffn_types=["mlp"] * 8, expert_layer_offset=1), "either ffn_types or expert_layer_period"),
        (dict(mixer_types=["mamba2"] * 7), "mixer_types must have one entry per layer"),
        (dict(mixer_types=["mamba2"] * 7 + ["transformer"]), r"mixer_types entries must be among .*'transformer'"),
        (dict(ffn_types=["mlp"] * 7 + ["kan"]), r"ffn_types entries must be among .*'kan'"),
        (dict(ffn_types=["pkm"] * 8, pkm_key_dim=33), "pkm_key_dim must be even"),
        (dict(ffn_types=["pkm"] * 8, pkm_num_keys=16, pkm_topk=32), r"pkm_topk \(32\) must not exceed pkm_num_keys"),
        (dict(ffn_types=["pkm"] * 8, pkm_heads=0), "pkm_heads must be a positive integer"),
        (dict(attn_layer_period=4, attn_layer_offset=4), r"attn_layer_offset must be an integer in \[0, "),
        (dict(ssm_type="attention"), "ssm_type must be one of"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
        (dict(mixer_types=["sliding_attention"] * 8), "sliding_window must be a positive integer"),
        (dict(mixer_types=["attention"] * 8, partial_rotary_factor=1.5), r"partial_rotary_factor must be in \(0, 1\]"),
        (dict(ffn_types=["moe"] * 8, num_experts=2, num_experts_per_tok=3), "must not exceed num_experts"),
        (dict(ffn_types=["moe"] * 8, router_scoring="relu"), "router_scoring must be one of"),
        (dict(mlp_type="gated"), "mlp_type must be one of"),
        (dict(norm_type="batch"), "norm_type must be one of"),
        (dict(hidden_act="gelu_new"), "hidden_act must be one of"),  # SwiGLU is SiLU's
        (dict(mlp_type="plain", hidden_act="wiggle"), r"hidden_act must be one of transformers' activations"),
        (dict(absolute_position_embeddings="yes"), "absolute_position_embeddings must be a bool"),
        (dict(attention_qk_norm="rms"), "attention_qk_norm must be a bool"),
        (dict(absolute_position_embeddings=True, max_position_embeddings=0), "max_position_embeddings must be a pos"),
        # 1024 * 2 inner channels are not heads of 48: the pure-SSM config's check, named for the hybrid's fields.
        (dict(mamba_d_head=48), r"the mamba2 layers' fields \(mamba_\*, time_step_\*\) .*head_dim \(48\)"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SsmHubHybridConfig(**kwargs)
