"""Runnable training recipes (YAML + accelerate configs), shipped as ``ssm_hub.recipes``; none are written yet."""
