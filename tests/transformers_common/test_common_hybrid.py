"""transformers' common model tests on ssm_hub_hybrid and on its native controls, Jamba and Bamba.

Each control is compared with an ssm_hub_hybrid of its own layout: Jamba's (Mamba-1 layers, attention every other
layer, a mixture of experts every other layer) and Bamba's (Mamba-2 layers and attention, each followed by an MLP).
"""

import pytest
from transformers import BambaConfig, BambaForCausalLM, BambaModel, JambaConfig, JambaForCausalLM, JambaModel

import ssm_hub
from common_harness import COMMON_FLAGS, control_and_ours
from transformers_test_sources import load_common_tests

pytestmark = pytest.mark.transformers_common

common_tests = load_common_tests()
# max_position_embeddings: the RoPE scaling tests run a sequence of 1.5 times it (the default, 262144, would not fit).
SIZES = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, pad_token_id=0, max_position_embeddings=64,
)
OUR_CLASSES = dict(
    model_classes=(
        ssm_hub.SsmHubHybridModel, ssm_hub.SsmHubHybridForCausalLM, ssm_hub.SsmHubHybridForSequenceClassification
    ),
    head_names=dict(
        base="SsmHubHybridModel", causal_lm="SsmHubHybridForCausalLM",
        sequence_classification="SsmHubHybridForSequenceClassification",
    ),
)
JAMBA_LAYOUT = dict(
    attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
    num_experts_per_tok=2,
)
BAMBA_MAMBA2 = dict(mamba_d_head=8, mamba_n_groups=1, mamba_chunk_size=8)

TestJambaControl, TestHybridAsJamba = control_and_ours(
    common_tests,
    "hybrid",
    control=dict(
        config_class=JambaConfig,
        config_fields={**SIZES, **JAMBA_LAYOUT, "use_mamba_kernels": False},
        model_classes=(JambaModel, JambaForCausalLM),
    ),
    ours=dict(config_class=ssm_hub.SsmHubHybridConfig, config_fields={**SIZES, **JAMBA_LAYOUT, "ssm_type": "mamba"},
              **OUR_CLASSES),
    flags=COMMON_FLAGS,
)

TestBambaControl, TestHybridAsBamba = control_and_ours(
    common_tests,
    "hybrid",
    control=dict(
        config_class=BambaConfig,
        config_fields={**SIZES, **BAMBA_MAMBA2, "attn_layer_indices": [1], "mamba_n_heads": 8},
        model_classes=(BambaModel, BambaForCausalLM),
    ),
    ours=dict(
        config_class=ssm_hub.SsmHubHybridConfig,
        config_fields={**SIZES, **BAMBA_MAMBA2, "mixer_types": ["mamba2", "attention"], "ffn_types": ["mlp", "mlp"]},
        **OUR_CLASSES,
    ),
    flags=COMMON_FLAGS,
)
