"""Triton kernels (``@triton.jit`` functions and their launchers), shipped as ``ssm_hub.kernels``.

No autograd and no dispatch here: ``ssm_hub.ops`` registers the launchers as torch custom ops and decides, through
``ssm_hub.backend``, when they run. Importing a module here needs triton; ``import ssm_hub`` does not.
"""
