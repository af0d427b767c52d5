"""Guards for weights that the fused ops read as tensors instead of calling their module.

The causal conv1d op takes the depthwise kernel as a tensor. If PEFT wrapped ``conv1d`` with LoRA, reading
``module.weight`` would use the frozen base kernel and the adapter would silently do nothing; PEFT's LoRA on a
depthwise conv is moreover not depthwise (its delta mixes channels), so no depthwise kernel can express it.
Rather than drop the adapter, refuse it with an error that says what to target instead.
"""

import torch
from torch import nn


def unwrapped_conv_parameters(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [C, K], bias [C] or None) of a depthwise ``nn.Conv1d``; ValueError if an adapter wraps it."""
    if hasattr(module, "base_layer"):
        raise ValueError(
            f"{name} is wrapped by a PEFT adapter ({type(module).__name__}); ssm_hub runs the depthwise conv as a "
            "fused op and cannot apply an adapter to it without dropping it. Target the mixer's linear projections "
            "instead (LoraConfig without target_modules picks them)."
        )
    return module.weight.squeeze(1), module.bias


def is_unhooked(module: nn.Module) -> bool:
    """True when calling ``module`` would run its own ``forward`` and nothing else, so a fused op may use its weights
    in its place: no forward hooks of its own or global ones, and no replaced ``forward`` (accelerate's offloading
    replaces it and keeps the weight elsewhere until it runs)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    return not any(hooks) and "forward" not in vars(module) and not hasattr(module, "_hf_hook")

