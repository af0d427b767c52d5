"""``ssm-hub train``: recipes (YAML) run through transformers' Trainer, for every ssm_hub model type.

    ssm-hub train --config recipes/debug_mamba2.yaml train.max_steps=20
    python -c "from ssm_hub.training import load_recipe, train; train(load_recipe('recipes/debug_hybrid.yaml'))"
"""

from ssm_hub.training.config import Recipe, load_recipe
from ssm_hub.training.run import train

__all__ = ["Recipe", "load_recipe", "train"]
