"""ssm_hub's Mamba-2 (SSD) models: the shared SSM language model (ssm_hub.models.ssm_lm) with the Mamba2Mixer.

    from transformers import AutoModelForCausalLM
    import ssm_hub
    model = AutoModelForCausalLM.from_config(SsmHubMamba2Config(hidden_size=256, num_hidden_layers=4))
"""

from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config
from ssm_hub.models.ssm_lm import SSMBackbone, SSMForCausalLM, SSMForSequenceClassification, SSMPreTrainedModel


class SsmHubMamba2PreTrainedModel(SSMPreTrainedModel):
    config_class = SsmHubMamba2Config
    mixer_class = Mamba2Mixer


class SsmHubMamba2Model(SSMBackbone, SsmHubMamba2PreTrainedModel):
    pass


class SsmHubMamba2ForCausalLM(SSMForCausalLM, SsmHubMamba2PreTrainedModel):
    backbone_class = SsmHubMamba2Model


class SsmHubMamba2ForSequenceClassification(SSMForSequenceClassification, SsmHubMamba2PreTrainedModel):
    backbone_class = SsmHubMamba2Model


# Auto classes these models answer to; ssm_hub.auto registers them and checkpoints carry them as auto_map.
AUTO_MAP = {
    "AutoModel": "SsmHubMamba2Model",
    "AutoModelForCausalLM": "SsmHubMamba2ForCausalLM",
    "AutoModelForSequenceClassification": "SsmHubMamba2ForSequenceClassification",
}
