"""RoPE of the hybrid's attention layers through transformers v5's ``rope_parameters`` (rope_type, rope_theta,
partial_rotary_factor and the scaling keys): the config stores it with its defaults and saves it; configs and
checkpoints saved with the earlier top-level ``rope_theta`` / ``partial_rotary_factor`` load (and convert) to the same
model; the model builds its rotary embedding from ``rope_parameters`` as it is when the model is built, with the
frequencies transformers' own RoPE code computes from the same config; every scaled rope_type gives the logits of
transformers' Llama (Phi-3 for a partially rotating longrope) with the same weights, beyond the original context,
saves and loads, and generates the same tokens with the cache as without; and what the attention layers cannot do is
refused, naming the key."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)
from transformers.models.bamba.modeling_bamba import BambaRotaryEmbedding
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import ssm_hub
from conftest import randomised, scaled_rope_parameters
from ssm_hub.conversion.formats.checkpoint import convert_checkpoint
from ssm_hub.conversion.seeding.from_attention import student_weights
from ssm_hub.layers.rope import ROPE_TYPES
from test_hybrid_model import full_attention, greedy_by_recomputation, tiny
from test_save_load import assert_loads_without_ssm_hub

HEAD_DIM = 16  # tiny(): hidden 64 over 4 heads
# A context of MAX_POSITIONS extended from ORIGINAL_POSITIONS; LONG lies beyond both, where every type scales
# (dynamic only beyond max_position_embeddings, longrope switches to its long factors beyond the original).
ORIGINAL_POSITIONS, MAX_POSITIONS, SHORT, LONG = 8, 32, 6, 40


def scaled(rope_type: str, partial_rotary_factor: float = 1.0) -> dict:
    return scaled_rope_parameters(rope_type, HEAD_DIM, ORIGINAL_POSITIONS, partial_rotary_factor)


# Every type of transformers' ROPE_INIT_FUNCTIONS.
SCALED_TYPES = [rope_type for rope_type in ROPE_TYPES if rope_type != "default"]


def attention_only(rope_parameters: dict, **overrides):
    """The tiny hybrid with attention and an MLP in every layer: Llama's stack, in the hybrid's classes."""
    return tiny(mixer_types=["attention"] * 5, ffn_types=["mlp"] * 5, head_dim=HEAD_DIM,
                max_position_embeddings=MAX_POSITIONS, rope_parameters=rope_parameters, layer_norm_epsilon=1e-6,
                tie_word_embeddings=False, **overrides)


def hybrid_from(teacher, model_type: str, config):
    """The hybrid ``config`` with ``teacher``'s weights, placed by attention seeding's own name map."""
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(student_weights(teacher.state_dict(), model_type, config), strict=True)
    return model


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
    # transformers' earlier names: rope_scaling for the dict, type for rope_type (Llama-2-era config.json files).
    config = tiny(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=500.0)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 500.0, "partial_rotary_factor": 1.0,
                                      "factor": 4.0}
    # Where both are there, rope_type wins, as in transformers (Phi-3's standardised dict keeps type "su").
    phi3_rope = {"type": "su", "rope_type": "longrope", **scaled("longrope")}
    assert tiny(rope_parameters=phi3_rope, max_position_embeddings=MAX_POSITIONS).rope_parameters == scaled("longrope")


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
    assert rotary.rotary_dim == int(HEAD_DIM * factor) and rotary.config.rope_parameters["rope_theta"] == 500.0
    # transformers' default RoPE (Bamba's, which reads partial_rotary_factor) computed from our config.
    expected, _ = BambaRotaryEmbedding.compute_default_rope_parameters(config)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=0, atol=0)
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
    assert AutoModelForCausalLM.from_config(config).model.rotary_emb.rope_type == "yarn"
    config.rope_parameters = {"rope_type": "linear"}  # set after the config's own check: the model checks again
    with pytest.raises(ValueError, match=r"SsmHubHybridConfig.rope_parameters: Missing required keys .*factor"):
        AutoModelForCausalLM.from_config(config)


def test_rope_parameters_are_checked_only_where_an_attention_layer_rotates():
    wrong = {"rope_type": "linear", "factor": 0.5}
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        tiny(rope_parameters=wrong)
    assert tiny(use_rope=False, rope_parameters=wrong).use_rope is False
    ssm_only = tiny(mixer_types=["mamba2"] * 5, rope_parameters=wrong)
    assert AutoModelForCausalLM.from_config(ssm_only).model.rotary_emb is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(rope_parameters={"rope_type": "ntk", "factor": 2.0}), r"rope_parameters: rope_type must be one of \("),
    (dict(rope_parameters={"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}),
     r"holds dicts under \['full_attention', 'sliding_attention'\]: RoPE per layer type .* is not supported"),
    (dict(rope_parameters={"rope_type": "linear"}), r"rope_parameters: Missing required keys .*'linear'.*factor"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 0.5}), r"rope_parameters: factor must be a number >= 1"),
    (dict(rope_parameters={**scaled("llama3"), "high_freq_factor": 1.0}),
     "high_freq_factor must exceed low_freq_factor"),
    (dict(rope_parameters={**scaled("longrope"), "short_factor": [1.0] * 3}),
     r"short_factor must hold one number per rotary frequency \(rotary_dim / 2 = 8\), got 3"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=0),
     "max_position_embeddings must be a positive int, got 0"),
    (dict(rope_parameters={"rope_theta": 0.0}), r"rope_parameters: rope_theta must be a positive number, got 0.0"),
    (dict(rope_parameters={"rope_theta": 1e4}, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "rope_scaling is the earlier name of rope_parameters; give one of them"),
    (dict(rope_parameters={"partial_rotary_factor": 1.5}), r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
    (dict(rope_parameters={"partial_rotary_factor": 0.05}), r"must give an even number >= 2 of rotated channels"),
    (dict(rope_parameters=[10000.0]), r"rope_parameters must be a dict"),
    (dict(rope_theta=500.0, rope_parameters={"rope_theta": 1000.0}),
     r"rope_theta=500.0 disagrees with rope_parameters\['rope_theta'\]=1000.0"),
])
def test_rope_parameters_the_attention_cannot_follow_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_a_key_the_rope_type_does_not_read_gets_transformers_warning():
    # As transformers' own configs: a warning, not an error (its common tests leave such keys behind).
    logger = logging.get_logger("transformers.modeling_rope_utils")
    with CaptureLogger(logger) as captured:
        config = tiny(rope_parameters={"rope_theta": 1e4, "factor": 2.0})
    assert "Unrecognized keys in `rope_parameters` for 'rope_type'='default': {'factor'}" in captured.out
    assert config.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize("rope_type", SCALED_TYPES)
def test_every_rope_type_gives_llamas_logits_beyond_the_original_context(rope_type):
    rope = scaled(rope_type, partial_rotary_factor=0.5 if rope_type == "proportional" else 1.0)
    config = attention_only(rope)
    torch.manual_seed(0)
    llama = randomised(LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=config.layer_norm_epsilon, tie_word_embeddings=False, rope_parameters=rope)))
    ours = hybrid_from(llama, "llama", config)
    default = hybrid_from(llama, "llama", attention_only({"rope_type": "default", "rope_theta": 500.0}))
    input_ids = torch.randint(1, config.vocab_size, (2, LONG))
    with torch.no_grad():
        # Long, short, long: dynamic RoPE grows, resets and grows again; longrope switches factors each time.
        for length in (LONG, SHORT, LONG):
            logits = ours(input_ids[:, :length]).logits
            torch.testing.assert_close(logits, llama(input_ids[:, :length]).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, default(input_ids).logits, atol=1e-3)  # the scaling matters here


def test_a_partially_rotating_longrope_model_gives_phi3s_logits():
    """Phi-3.5's RoPE: longrope with the factors for half of each head, original_max_position_embeddings at the
    config's top level (transformers moves it into rope_parameters)."""
    rope = scaled("longrope", partial_rotary_factor=0.5)
    del rope["original_max_position_embeddings"]
    torch.manual_seed(0)
    phi3 = randomised(Phi3ForCausalLM(Phi3Config(
        vocab_size=97, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=ORIGINAL_POSITIONS, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope)))
    assert phi3.config.rope_parameters["partial_rotary_factor"] == 0.5
    config = attention_only(phi3.config.rope_parameters)
    assert config.rope_parameters["original_max_position_embeddings"] == ORIGINAL_POSITIONS
    ours = hybrid_from(phi3, "phi3", config)
    assert ours.model.rotary_emb.rotary_dim == HEAD_DIM // 2
    input_ids = torch.randint(1, 97, (2, LONG))
    with torch.no_grad():
        for length in (SHORT, LONG):
            torch.testing.assert_close(ours(input_ids[:, :length]).logits, phi3(input_ids[:, :length]).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3"])
def test_generation_with_the_cache_equals_recomputation_beyond_the_original_context(rope_type):
    # Types whose frequencies do not depend on the length: with dynamic or longrope, the cached keys keep the
    # frequencies of the length they were computed at (in transformers' Llama as here), so the two differ by design.
    model = randomised(AutoModelForCausalLM.from_config(full_attention(
        max_position_embeddings=MAX_POSITIONS, rope_parameters=scaled(rope_type))), scale=0.3)
    prompt = torch.randint(1, 97, (2, SHORT))
    new_tokens = LONG - SHORT
    expected = greedy_by_recomputation(model, prompt, new_tokens)
    generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    assert torch.equal(generated, expected)
    default = AutoModelForCausalLM.from_config(full_attention(max_position_embeddings=MAX_POSITIONS)).eval()
    default.load_state_dict(model.state_dict())
    assert not torch.equal(greedy_by_recomputation(default, prompt, new_tokens), expected)  # the scaling matters


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic"])
def test_scaled_rope_parameters_save_and_load_to_the_same_model(rope_type, tmp_path):
    config = full_attention(max_position_embeddings=MAX_POSITIONS, rope_parameters=scaled(rope_type))
    model = randomised(AutoModelForCausalLM.from_config(config))
    model.save_pretrained(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["rope_parameters"] == \
        config.rope_parameters
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    assert loaded.config.rope_parameters == config.rope_parameters
    input_ids = torch.randint(1, 97, (2, LONG))
    with torch.no_grad():
        # The frequencies are not in the checkpoint: loading on the meta device must recompute them.
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    assert_loads_without_ssm_hub(model, tmp_path / "checkpoint", input_ids, tmp_path)


def test_the_multimodal_config_saves_and_loads_scaled_rope_parameters(tmp_path):
    config = ssm_hub.SsmHubMultimodalConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mixer_types=["mamba2", "attention"], ffn_types=["mlp", "mlp"], mamba_d_state=8, mamba_d_head=16,
        mamba_chunk_size=8, patch_size=4, image_token_id=70, image_row_end_token_id=71,
        max_position_embeddings=MAX_POSITIONS, rope_parameters=scaled("yarn"))
    config.save_pretrained(tmp_path)
    loaded = ssm_hub.SsmHubMultimodalConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == config.rope_parameters == scaled("yarn")
    assert AutoModelForCausalLM.from_config(loaded).model.language_model.rotary_emb.rope_type == "yarn"
