"""Registration with transformers' Auto classes and PEFT, run once by ``import ssm_hub``.

This is the only module that calls ``AutoConfig.register`` / ``AutoModel*.register``,
``register_for_auto_class`` and PEFT's default-target tables: one place to read what ``import ssm_hub`` changes.
Registration never uses ``exist_ok=True``: a clash with another model type must fail loudly.
"""

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

from ssm_hub.models.hybrid import modeling_hybrid
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.mamba import modeling_mamba
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba2 import modeling_mamba2
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config
from ssm_hub.models.multimodal import modeling_multimodal
from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor

ARCHITECTURES = (
    (SsmHubMambaConfig, modeling_mamba),
    (SsmHubMamba2Config, modeling_mamba2),
    (SsmHubHybridConfig, modeling_hybrid),
    (SsmHubMultimodalConfig, modeling_multimodal),
)

# LoRA targets used when a LoraConfig names none: every projection of the mixer. conv1d is left out (a depthwise
# kernel of width 4 gains little from a low-rank update) but works when targeted explicitly.
PEFT_TARGET_MODULES = {
    SsmHubMambaConfig.model_type: ["in_proj", "x_proj", "dt_proj", "out_proj"],
    SsmHubMamba2Config.model_type: ["in_proj", "out_proj"],
    # Attention and SSM projections; PEFT matches the names that exist in a given layout. The experts' fused 3-D
    # weights are parameters, not modules: target them with LoraConfig(target_parameters=[...]).
    SsmHubHybridConfig.model_type: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "dt_proj", "out_proj"],
    # The hybrid's, plus the image tokens' own SSM projections under Mixture-of-Mamba (modality 1 of 2).
    SsmHubMultimodalConfig.model_type: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "dt_proj",
                                        "out_proj", *(f"modality_{name}.0" for name in
                                                      ("in_proj", "x_proj", "dt_proj", "out_proj"))],
}


def _register_transformers() -> None:
    for config_class, modeling_module in ARCHITECTURES:
        AutoConfig.register(config_class.model_type, config_class)
        config_class.register_for_auto_class("AutoConfig")
        for auto_class_name, class_name in modeling_module.AUTO_MAP.items():
            model_class = getattr(modeling_module, class_name)
            getattr(transformers, auto_class_name).register(config_class, model_class)
            model_class.register_for_auto_class(auto_class_name)
    # The vision-language model's processors; the image processor needs no torchvision (its PIL backend only).
    AutoImageProcessor.register(SsmHubMultimodalConfig,
                                image_processor_classes={"pil": SsmHubMultimodalImageProcessor})
    AutoProcessor.register(SsmHubMultimodalConfig, SsmHubMultimodalProcessor)


def _register_peft() -> None:
    """PEFT looks up default LoRA targets by model_type; it has none for ours."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # PEFT is a dependency, but a broken or partial install must not break `import ssm_hub`
        return
    for model_type, targets in PEFT_TARGET_MODULES.items():
        if model_type in table:
            raise ValueError(f"PEFT already has LoRA defaults for {model_type}; refusing to overwrite them")
        table[model_type] = list(targets)


_register_transformers()
_register_peft()
