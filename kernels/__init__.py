"""Triton kernels (``@triton.jit`` functions and their launchers), shipped as ``ssm_hub.kernels``.

Empty until the Triton issue lands: every op in ``ssm_hub.ops`` runs its pure-torch reference meanwhile.
"""
