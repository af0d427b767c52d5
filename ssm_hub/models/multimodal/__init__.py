"""The decoder-only vision-language SSM (model_type ``ssm_hub_multimodal``): image patches and text in one causal
stream over the hybrid stack, with optional Mixture-of-Mamba."""
