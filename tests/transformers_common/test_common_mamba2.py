"""transformers' common model tests on ssm_hub_mamba2 and on its native control, transformers' Mamba2ForCausalLM."""

import pytest
from transformers import Mamba2Config, Mamba2ForCausalLM, Mamba2Model

import ssm_hub
from common_harness import COMMON_FLAGS, control_and_ours
from transformers_test_sources import load_common_tests

pytestmark = pytest.mark.transformers_common

SIZES = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, n_groups=2, conv_kernel=4,
    chunk_size=8, pad_token_id=0,
)
# Pure SSMs return no attention weights and cannot be split by a device map's attention heads.
FLAGS = dict(has_attentions=False, test_missing_keys=False, **COMMON_FLAGS)

TestMamba2Control, TestMamba2Ours = control_and_ours(
    load_common_tests(),
    "mamba2",
    control=dict(
        config_class=Mamba2Config,
        config_fields={**SIZES, "num_heads": 8},
        model_classes=(Mamba2Model, Mamba2ForCausalLM),
    ),
    ours=dict(
        config_class=ssm_hub.SsmHubMamba2Config,
        config_fields=SIZES,
        model_classes=(
            ssm_hub.SsmHubMamba2Model, ssm_hub.SsmHubMamba2ForCausalLM, ssm_hub.SsmHubMamba2ForSequenceClassification
        ),
        head_names=dict(
            base="SsmHubMamba2Model", causal_lm="SsmHubMamba2ForCausalLM",
            sequence_classification="SsmHubMamba2ForSequenceClassification",
        ),
    ),
    flags=FLAGS,
)
