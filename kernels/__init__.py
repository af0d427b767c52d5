"""Triton kernels (``@triton.jit`` functions and their launchers), shipped as ``ssm_hub.kernels``.

No autograd and no dispatch here: ``ssm_hub.ops`` registers the launchers as torch custom ops and decides, through
``ssm_hub.backend``, when they run; the kernels import nothing of ssm_hub outside this package. Importing a kernel
module needs triton (``interpreter`` does not); ``import ssm_hub`` does not.
"""
