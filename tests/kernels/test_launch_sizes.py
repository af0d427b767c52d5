"""The launchers' plain-Python cdiv and next_power_of_2 give triton's integers.

    pytest tests/kernels/test_launch_sizes.py
"""

import pytest

triton = pytest.importorskip("triton")

from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2  # noqa: E402

VALUES = [*range(0, 4200), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**40 + 3]


def test_next_power_of_2_matches_triton():
    assert [next_power_of_2(n) for n in VALUES] == [triton.next_power_of_2(n) for n in VALUES]


@pytest.mark.parametrize("denominator", [1, 2, 3, 16, 64, 100, 256, 1024])
def test_cdiv_matches_triton(denominator):
    numerators = [n for n in VALUES if n > 0]
    assert [cdiv(n, denominator) for n in numerators] == [triton.cdiv(n, denominator) for n in numerators]
