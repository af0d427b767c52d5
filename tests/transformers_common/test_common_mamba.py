"""transformers' common model tests on ssm_hub_mamba and on its native control, transformers' MambaForCausalLM."""

import pytest
from transformers import MambaConfig, MambaForCausalLM, MambaModel

import ssm_hub
from common_harness import COMMON_FLAGS, control_and_ours
from transformers_test_sources import load_common_tests

pytestmark = pytest.mark.transformers_common

SIZES = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, pad_token_id=0,
)
# Pure SSMs return no attention weights and cannot be split by a device map's attention heads.
FLAGS = dict(has_attentions=False, test_missing_keys=False, **COMMON_FLAGS)

TestMambaControl, TestMambaOurs = control_and_ours(
    load_common_tests(),
    "mamba",
    control=dict(config_class=MambaConfig, config_fields=SIZES, model_classes=(MambaModel, MambaForCausalLM)),
    ours=dict(
        config_class=ssm_hub.SsmHubMambaConfig,
        config_fields=SIZES,
        model_classes=(
            ssm_hub.SsmHubMambaModel, ssm_hub.SsmHubMambaForCausalLM, ssm_hub.SsmHubMambaForSequenceClassification
        ),
        head_names=dict(
            base="SsmHubMambaModel", causal_lm="SsmHubMambaForCausalLM",
            sequence_classification="SsmHubMambaForSequenceClassification",
        ),
    ),
    flags=FLAGS,
)
