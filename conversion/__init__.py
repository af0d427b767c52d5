"""Conversion between ssm_hub and other checkpoints, shipped as ``ssm_hub.conversion``, one sub-package per job:

- ``formats``: read and write other checkpoint formats (transformers' Mamba, Mamba2, Jamba and Bamba, mamba_ssm's):
  a declarative map per family and the engine that applies and checks them (``ssm-hub convert``);
- ``seeding``: build a student from a teacher: an SSM / attention hybrid from an attention model, a multimodal
  model from Fuyu, image support for a language model (``ssm-hub convert --to ssm_hub_hybrid / ssm_hub_multimodal``);
- ``distillation``: distil a seeded student from its teacher, stage by stage, and time both (``ssm-hub distill``);
- ``publishing``: model cards and the upload to the Hub (``ssm-hub push``).
"""
