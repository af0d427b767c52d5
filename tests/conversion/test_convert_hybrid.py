"""Hybrid checkpoint conversion: transformers' JambaForCausalLM and BambaForCausalLM <-> ssm_hub_hybrid, on tiny
random models built here.

Parity is the max |fp32 logit difference| against the model the checkpoint came from (1e-5).
"""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BambaConfig, BambaForCausalLM, JambaConfig, JambaForCausalLM

import ssm_hub
from conftest import randomised
from ssm_hub.conversion.formats.checkpoint import convert_checkpoint
from ssm_hub.conversion.formats.bamba import BAMBA_TO_SSM_HUB_HYBRID, SSM_HUB_HYBRID_TO_BAMBA
from ssm_hub.conversion.formats.engine import apply_config_map
from ssm_hub.conversion.formats.hybrid import SSM_HUB_HYBRID_TO_SSM_HUB
from ssm_hub.conversion.formats.jamba import JAMBA_TO_SSM_HUB_HYBRID, SSM_HUB_HYBRID_TO_JAMBA

TOLERANCE = 1e-5
INPUT_IDS = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def tiny_jamba(**overrides) -> JambaForCausalLM:
    # 4 layers: attention in layer 1 (of period 2 ... 3), experts in odd layers; MLP and Mamba-1 elsewhere.
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
    )
    return randomised(JambaForCausalLM(JambaConfig(**{**fields, **overrides})))


def jamba_like_hybrid(**overrides):
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, ssm_type="mamba",
        mixer_types=["mamba", "mamba", "attention"] * 2, ffn_types=["mlp", "moe"] * 3, use_rope=False,
        mamba_inner_layernorms=True, residual_in_fp32=False, tie_word_embeddings=False,
    )
    return randomised(ssm_hub.SsmHubHybridForCausalLM(ssm_hub.SsmHubHybridConfig(**{**fields, **overrides})))


def assert_same_logits(model, reference) -> None:
    with torch.no_grad():
        difference = (model(INPUT_IDS).logits - reference(INPUT_IDS).logits).abs().max().item()
    assert difference <= TOLERANCE, f"max |logit difference| {difference:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 1}, {"tie_word_embeddings": True}])
def test_jamba_to_ssm_hub_keeps_logits(tmp_path, overrides):
    jamba = tiny_jamba(**overrides)
    jamba.save_pretrained(tmp_path / "jamba")
    convert_checkpoint(tmp_path / "jamba", tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert isinstance(ours, ssm_hub.SsmHubHybridForCausalLM)
    moe_layers = [i for i in range(4) if i % 2 == 1] if jamba.config.num_experts > 1 else []
    assert ours.config.mixer_types == ["mamba", "attention", "mamba", "attention"]
    assert [i for i, kind in enumerate(ours.config.ffn_types) if kind == "moe"] == moe_layers
    assert_same_logits(ours, jamba)


def test_ssm_hub_to_jamba_and_back_keeps_logits(tmp_path):
    ours = jamba_like_hybrid()
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "jamba", to="jamba")
    jamba = JambaForCausalLM.from_pretrained(tmp_path / "jamba").eval()
    assert (jamba.config.attn_layer_period, jamba.config.attn_layer_offset) == (3, 2)
    assert (jamba.config.expert_layer_period, jamba.config.expert_layer_offset) == (2, 1)
    assert_same_logits(jamba, ours)
    convert_checkpoint(tmp_path / "jamba", tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert again.config.mixer_types == ours.config.mixer_types and again.config.ffn_types == ours.config.ffn_types
    assert_same_logits(again, ours)


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer_types=["mamba", "sliding_attention"] * 3, sliding_window=4), r"mixer_types holds \['sliding_attention'\]"),
    (dict(ssm_type="mamba2", mixer_types=["mamba2", "mamba", "attention"] * 2, mamba_d_head=16), r"\['mamba2'\]"),
    (dict(ffn_types=["mlp", "pkm"] * 3, pkm_num_keys=8, pkm_key_dim=8, pkm_topk=2), r"ffn_types holds \['pkm'\]"),
    (dict(mixer_types=["mamba", "attention", "attention", "mamba", "mamba", "mamba"]), "mixer_types = .* has no period form"),
    (dict(use_rope=True), "use_rope = True is not supported: Jamba's attention has no positional encoding"),
    (dict(residual_in_fp32=True), "residual_in_fp32 = True is not supported"),
    (dict(mamba_inner_layernorms=False), "mamba_inner_layernorms = False is not supported"),
])
def test_what_jamba_cannot_hold_is_named(tmp_path, overrides, message):
    jamba_like_hybrid(**overrides).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(tmp_path / "ours", tmp_path / "jamba", to="jamba")


def test_hybrid_to_a_pure_ssm_target_is_an_error(tmp_path):
    jamba_like_hybrid().save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="hybrid model: use to='jamba' or to='bamba' or to='ssm_hub'"):
        convert_checkpoint(tmp_path / "ours", tmp_path / "mamba", to="mamba")


def test_ssm_hub_hybrid_resaves_itself(tmp_path):
    ours = jamba_like_hybrid(mixer_types=["mamba2", "mamba", "attention"] * 2, mamba_d_head=16,
                             ffn_types=["mlp", "moe", "pkm"] * 2, pkm_num_keys=8, pkm_key_dim=8, pkm_topk=2)
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "copy", dtype="float32")
    assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval(), ours)


def tiny_bamba(**overrides) -> BambaForCausalLM:
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head="auto", mamba_n_groups=2,
        mamba_d_state=8, mamba_chunk_size=8, attention_bias=True, mlp_bias=True,
    )
    return randomised(BambaForCausalLM(BambaConfig(**{**fields, **overrides})))


def bamba_like_hybrid(**overrides):
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, mixer_types=["mamba2", "mamba2", "attention", "mamba2", "attention"],
        ffn_types=["mlp"] * 5, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8,
        partial_rotary_factor=0.5, rope_theta=5000.0, residual_in_fp32=False, tie_word_embeddings=False,
    )
    return randomised(ssm_hub.SsmHubHybridForCausalLM(ssm_hub.SsmHubHybridConfig(**{**fields, **overrides})))


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attn_layer_indices": [0]}])
def test_bamba_to_ssm_hub_keeps_logits(tmp_path, overrides):
    bamba = tiny_bamba(**overrides)
    bamba.save_pretrained(tmp_path / "bamba")
    convert_checkpoint(tmp_path / "bamba", tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    attention = overrides.get("attn_layer_indices", [1, 3])
    assert ours.config.mixer_types == ["attention" if i in attention else "mamba2" for i in range(4)]
    assert ours.config.partial_rotary_factor == 0.5
    assert_same_logits(ours, bamba)


def test_ssm_hub_to_bamba_and_back_keeps_logits(tmp_path):
    ours = bamba_like_hybrid()
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "bamba", to="bamba")
    bamba = BambaForCausalLM.from_pretrained(tmp_path / "bamba").eval()
    assert bamba.config.attn_layer_indices == [2, 4] and bamba.config.rope_parameters["rope_theta"] == 5000.0
    assert_same_logits(bamba, ours)
    convert_checkpoint(tmp_path / "bamba", tmp_path / "again")
    assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval(), ours)


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer_types=["mamba", "mamba2", "attention", "mamba2", "attention"]), r"mixer_types holds \['mamba'\]"),
    (dict(ffn_types=["mlp", "moe", "mlp", "mlp", "mlp"], num_experts=2, num_experts_per_tok=1),
     "every Bamba layer is followed by an MLP"),
    (dict(partial_rotary_factor=1.0), "partial_rotary_factor = 1.0 is not supported"),
    (dict(use_rope=False), "use_rope = False is not supported"),
])
def test_what_bamba_cannot_hold_is_named(tmp_path, overrides, message):
    bamba_like_hybrid(**overrides).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(tmp_path / "ours", tmp_path / "bamba", to="bamba")


@pytest.mark.parametrize("config, conversion_map", [
    (JambaConfig(), JAMBA_TO_SSM_HUB_HYBRID),
    (BambaConfig(), BAMBA_TO_SSM_HUB_HYBRID),
    (ssm_hub.SsmHubHybridConfig(), SSM_HUB_HYBRID_TO_SSM_HUB),
])
def test_config_maps_know_every_field_of_their_source(config, conversion_map):
    # A field added to transformers' or ssm_hub's config without a map entry would be warned about and ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_config_map(config.to_dict(), conversion_map)


@pytest.mark.parametrize("model, conversion_map", [
    (jamba_like_hybrid, SSM_HUB_HYBRID_TO_JAMBA), (bamba_like_hybrid, SSM_HUB_HYBRID_TO_BAMBA),
])
def test_maps_to_transformers_know_every_field_of_a_hybrid(model, conversion_map):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_config_map(model().config.to_dict(), conversion_map)
