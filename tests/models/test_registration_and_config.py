"""Registration with the Auto classes and config validation for every ssm_hub architecture."""

import pytest
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import ssm_hub
from conftest import tiny_config

OUR_MODEL_TYPES = {"ssm_hub_mamba": ssm_hub.SsmHubMambaConfig, "ssm_hub_mamba2": ssm_hub.SsmHubMamba2Config}


def test_no_model_type_collides_with_transformers():
    assert set(OUR_MODEL_TYPES).isdisjoint(CONFIG_MAPPING_NAMES)
    for config_class in OUR_MODEL_TYPES.values():
        assert config_class.model_type.startswith("ssm_hub_")


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification])
def test_auto_classes_build_our_models(model_type, auto_class):
    fields = {k: v for k, v in tiny_config(model_type).to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **fields)
    assert type(config) is OUR_MODEL_TYPES[model_type]
    model = auto_class.from_config(config)
    assert type(model).__module__.startswith("ssm_hub.models.")
    assert type(model).__name__.lower().startswith(model_type.replace("_", ""))


def test_registration_fails_loudly_if_transformers_ships_our_model_type(monkeypatch):
    # With exist_ok=True this would silently replace transformers' own config class.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    monkeypatch.setitem(CONFIG_MAPPING._mapping, "ssm_hub_mamba", "MambaConfig")
    with pytest.raises(ValueError, match="ssm_hub_mamba"):
        ssm_hub.auto._register_transformers()


def test_config_field_names_follow_transformers():
    ours = ssm_hub.SsmHubMambaConfig().to_dict()
    theirs = transformers.MambaConfig().to_dict()
    shared = {"hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand", "conv_kernel", "time_step_rank"}
    assert shared <= set(ours) & set(theirs)
    ours2 = ssm_hub.SsmHubMamba2Config().to_dict()
    theirs2 = transformers.Mamba2Config().to_dict()
    shared2 = {"hidden_size", "num_hidden_layers", "state_size", "num_heads", "head_dim", "n_groups", "chunk_size"}
    assert shared2 <= set(ours2) & set(theirs2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, head_dim=16), "divisible by head_dim"),
        (dict(num_heads=3, head_dim=8), r"num_heads \* head_dim"),
        (dict(n_groups=3), "divisible by n_groups"),
        (dict(conv_kernel=1), "conv_kernel"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
        (dict(time_step_limit=(1.0, 0.5)), "time_step_limit"),
    ],
)
def test_invalid_mamba2_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("ssm_hub_mamba2", **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(state_size=-1), "state_size"),
        (dict(time_step_rank=0), "time_step_rank"),
        (dict(time_step_init_scheme="nope"), "time_step_init_scheme"),
        (dict(conv_kernel=1), "conv_kernel"),
    ],
)
def test_invalid_mamba_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("ssm_hub_mamba", **overrides)


def test_config_round_trips_through_dict(model_type):
    config = tiny_config(model_type)
    again = type(config).from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
