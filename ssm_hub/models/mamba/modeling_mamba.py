"""ssm_hub's Mamba-1 (selective scan) models: the shared SSM language model (ssm_hub.models.ssm_lm) with the MambaMixer.

    from transformers import AutoModelForCausalLM
    import ssm_hub
    model = AutoModelForCausalLM.from_config(SsmHubMambaConfig(hidden_size=256, num_hidden_layers=4))
"""

from ssm_hub.layers.mamba_mixer import MambaMixer
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.ssm_lm import SSMBackbone, SSMForCausalLM, SSMForSequenceClassification, SSMPreTrainedModel


class SsmHubMambaPreTrainedModel(SSMPreTrainedModel):
    config_class = SsmHubMambaConfig
    mixer_class = MambaMixer


class SsmHubMambaModel(SSMBackbone, SsmHubMambaPreTrainedModel):
    pass


class SsmHubMambaForCausalLM(SSMForCausalLM, SsmHubMambaPreTrainedModel):
    backbone_class = SsmHubMambaModel


class SsmHubMambaForSequenceClassification(SSMForSequenceClassification, SsmHubMambaPreTrainedModel):
    backbone_class = SsmHubMambaModel


# Auto classes these models answer to; ssm_hub.auto registers them and checkpoints carry them as auto_map.
AUTO_MAP = {
    "AutoModel": "SsmHubMambaModel",
    "AutoModelForCausalLM": "SsmHubMambaForCausalLM",
    "AutoModelForSequenceClassification": "SsmHubMambaForSequenceClassification",
}
