"""``ssm-hub train``: recipes (YAML) run through transformers' Trainer, for every ssm_hub model type.

    ssm-hub train --config recipes/debug_mamba2.yaml train.max_steps=20
    python -c "from ssm_hub.training import load_recipe, train; train(load_recipe('recipes/debug_hybrid.yaml'))"

``train`` (ssm_hub.training.run) is imported on first use: it loads torch and transformers, and the command line
reads its arguments and the recipe (ssm_hub.training.config) and says what it is about to do before that.
"""

from ssm_hub.training.config import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]


def __getattr__(name: str):
    if name == "train":
        from ssm_hub.training.run import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
