"""Helpers for the kernel tests: where they run, and dtype-dependent tolerances.

On a machine without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest.py)
on small shapes; with a GPU they run for real. Tests that only make sense on a GPU are marked ``gpu``.
"""

import pytest
import torch

from ssm_hub.backend import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Kernel and reference both accumulate in float32 from the same inputs; they differ by float32 rounding and the
# order of sums (fp32), or by one rounding of the bf16 output (2^-8 relative) on top of it (bf16).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
