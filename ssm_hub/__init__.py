"""ssm_hub: state-space models (Mamba, Mamba-2) and SSM / attention / MoE hybrids as first-class transformers models.

``import ssm_hub`` registers the model types ``ssm_hub_mamba``, ``ssm_hub_mamba2`` and ``ssm_hub_hybrid`` with
AutoConfig, AutoModel, AutoModelForCausalLM and AutoModelForSequenceClassification, the vision-language
``ssm_hub_multimodal`` with AutoConfig, AutoModel, AutoModelForImageTextToText and AutoModelForCausalLM, and gives
PEFT default LoRA targets for them.
"""

# The console script `ssm-hub` imports this package, and with it torch and transformers (seconds), before its own code
# runs: its first status line is said here, before those imports (ssm_hub.cli and ssm_hub.progress take the standard
# library only).
from ssm_hub.cli import announce_console_command

announce_console_command()

from ssm_hub import auto  # noqa: E402, F401  (registration happens on import)
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.hybrid.modeling_hybrid import (
    SsmHubHybridForCausalLM,
    SsmHubHybridForSequenceClassification,
    SsmHubHybridModel,
)
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba.modeling_mamba import (
    SsmHubMambaForCausalLM,
    SsmHubMambaForSequenceClassification,
    SsmHubMambaModel,
)
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config
from ssm_hub.models.mamba2.modeling_mamba2 import (
    SsmHubMamba2ForCausalLM,
    SsmHubMamba2ForSequenceClassification,
    SsmHubMamba2Model,
)
from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
from ssm_hub.models.multimodal.modeling_multimodal import (
    SsmHubMultimodalForConditionalGeneration,
    SsmHubMultimodalModel,
)

__version__ = "0.1.0"

__all__ = [
    "SsmHubMambaConfig",
    "SsmHubMambaModel",
    "SsmHubMambaForCausalLM",
    "SsmHubMambaForSequenceClassification",
    "SsmHubMamba2Config",
    "SsmHubMamba2Model",
    "SsmHubMamba2ForCausalLM",
    "SsmHubMamba2ForSequenceClassification",
    "SsmHubHybridConfig",
    "SsmHubHybridModel",
    "SsmHubHybridForCausalLM",
    "SsmHubHybridForSequenceClassification",
    "SsmHubMultimodalConfig",
    "SsmHubMultimodalModel",
    "SsmHubMultimodalForConditionalGeneration",
]
