"""Checkpoint conversion between ssm_hub and other formats, shipped as ``ssm_hub.conversion``."""
