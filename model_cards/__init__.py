"""Model card templates, shipped as ``ssm_hub.model_cards``; none are written yet."""
