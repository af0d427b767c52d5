"""RoPE of the hybrid's attention layers through transformers v5's ``rope_parameters`` (rope_type, rope_theta,
partial_rotary_factor): the config stores it with its defaults and saves it; configs and checkpoints saved with the
earlier top-level ``rope_theta`` / ``partial_rotary_factor`` load (and convert) to the same model; the model builds
its rotary embedding from ``rope_parameters`` as it is when the model is built, with the frequencies transformers'
own RoPE code computes from the same config; and what the attention layers cannot do is refused, naming the key."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BambaForCausalLM
from transformers.models.bamba.modeling_bamba import BambaRotaryEmbedding

import ssm_hub
from ssm_hub.conversion.checkpoint import convert_checkpoint
from test_hybrid_model import full_attention, tiny

HEAD_DIM = 16  # tiny(): hidden 64 over 4 heads


def test_config_stores_rope_parameters_with_their_defaults(tmp_path):
    config = tiny()
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    config = tiny(rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5})
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    assert (config.rope_theta, config.partial_rotary_factor) == (500.0, 0.5)  # the earlier names still read
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["rope_parameters"] == config.rope_parameters
    assert "rope_theta" not in stored and "partial_rotary_factor" not in stored
    assert ssm_hub.SsmHubHybridConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


def test_the_earlier_top_level_fields_fold_into_rope_parameters():
    config = tiny(rope_theta=500.0, partial_rotary_factor=0.5)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    given = {"rope_theta": 500.0}
    assert tiny(rope_parameters=given, partial_rotary_factor=0.5).rope_parameters["partial_rotary_factor"] == 0.5
    assert given == {"rope_theta": 500.0}  # the caller's dict is not edited
    config.rope_theta = 250.0
    assert config.rope_parameters["rope_theta"] == 250.0


def test_a_checkpoint_saved_with_the_earlier_fields_loads_with_the_same_logits(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny(rope_parameters={"rope_theta": 500.0,
                                                                   "partial_rotary_factor": 0.5})).eval()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    stored = json.loads(config_file.read_text())
    rope = stored.pop("rope_parameters")
    stored.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    config_file.write_text(json.dumps(stored))  # what ssm_hub wrote before rope_parameters
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    input_ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    # `ssm-hub convert` reads config.json as stored: the earlier fields reach both targets.
    convert_checkpoint(tmp_path, tmp_path / "again")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "again").config.rope_parameters == \
        model.config.rope_parameters


def test_conversion_to_bamba_reads_rope_parameters(tmp_path):
    layout = dict(mixer_types=["mamba2", "attention", "mamba2", "attention", "mamba2"], ffn_types=["mlp"] * 5,
                  residual_in_fp32=False, tie_word_embeddings=False)
    ours = AutoModelForCausalLM.from_config(tiny(rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5},
                                                 **layout)).eval()
    ours.save_pretrained(tmp_path / "ours")
    convert_checkpoint(tmp_path / "ours", tmp_path / "bamba", to="bamba")
    bamba = BambaForCausalLM.from_pretrained(tmp_path / "bamba").eval()
    assert bamba.config.rope_parameters["rope_theta"] == 500.0
    input_ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(bamba(input_ids).logits, ours(input_ids).logits, rtol=1e-5, atol=1e-5)
    # Bamba rotates half of each head: a hybrid that rotates all of it cannot become one, and says which key.
    AutoModelForCausalLM.from_config(tiny(**layout)).save_pretrained(tmp_path / "whole")
    with pytest.raises(ValueError, match=r"rope_parameters.partial_rotary_factor = 1.0 is not supported"):
        convert_checkpoint(tmp_path / "whole", tmp_path / "refused", to="bamba")


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.25])
def test_the_model_rotates_as_rope_parameters_say_and_as_transformers_computes(factor):
    config = tiny(rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": factor})
    model = AutoModelForCausalLM.from_config(config)
    rotary = model.model.rotary_emb
    assert rotary.rotary_dim == int(HEAD_DIM * factor) and rotary.rope_theta == 500.0
    # transformers' default RoPE (Bamba's, which reads partial_rotary_factor) computed from our config.
    expected, _ = BambaRotaryEmbedding.compute_default_rope_parameters(config)
    torch.testing.assert_close(rotary.inv_freq(), expected, rtol=0, atol=0)
    for block in model.model.layers:
        if hasattr(block, "self_attn"):
            assert block.self_attn.rotary_emb.rotary_dim == rotary.rotary_dim


def test_rope_parameters_changed_after_the_config_was_built_are_used():
    # transformers' tests (and users) edit config.rope_parameters before building the model.
    config = full_attention()
    whole = AutoModelForCausalLM.from_config(config).eval()
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    half = AutoModelForCausalLM.from_config(config).eval()
    half.load_state_dict(whole.state_dict())
    assert half.model.rotary_emb.rotary_dim == HEAD_DIM // 2
    input_ids = torch.randint(1, 97, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(half(input_ids).logits, whole(input_ids).logits, atol=1e-4)
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type must be 'default'"):
        AutoModelForCausalLM.from_config(config)


def test_rope_parameters_are_checked_only_where_an_attention_layer_rotates():
    scaled = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type must be 'default'"):
        tiny(rope_parameters=scaled)
    assert tiny(use_rope=False, rope_parameters=scaled).use_rope is False
    ssm_only = tiny(mixer_types=["mamba2"] * 5, rope_parameters=scaled)
    assert AutoModelForCausalLM.from_config(ssm_only).model.rotary_emb is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), r"rope_parameters: rope_type must be 'default'"),
    (dict(rope_parameters={"rope_theta": 1e4, "factor": 2.0}),
     r"keys that the default RoPE does not read: \['factor'\]"),
    (dict(rope_parameters={"rope_theta": 0.0}), r"rope_parameters: rope_theta must be a positive number, got 0.0"),
    (dict(rope_parameters={"partial_rotary_factor": 1.5}), r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
    (dict(rope_parameters={"partial_rotary_factor": 0.05}), r"must give an even number >= 2 of rotated channels"),
    (dict(rope_parameters=[10000.0]), r"rope_parameters must be a dict"),
    (dict(rope_theta=500.0, rope_parameters={"rope_theta": 1000.0}),
     r"rope_theta=500.0 disagrees with rope_parameters\['rope_theta'\]=1000.0"),
])
def test_rope_parameters_the_attention_cannot_follow_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)
