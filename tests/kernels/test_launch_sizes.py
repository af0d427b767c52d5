"""The launchers' plain-Python helpers: cdiv and next_power_of_2 give triton's integers, strides stand in zeros for
a missing input, and cu_seqlens becomes the document number of each token.

    pytest tests/kernels/test_launch_sizes.py
"""

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402

from ssm_hub.kernels.launch_sizes import cdiv, next_power_of_2, strides  # noqa: E402
from ssm_hub.kernels.varlen import document_numbers, num_states  # noqa: E402

VALUES = [*range(0, 4200), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**40 + 3]


def test_next_power_of_2_matches_triton():
    assert [next_power_of_2(n) for n in VALUES] == [triton.next_power_of_2(n) for n in VALUES]


@pytest.mark.parametrize("denominator", [1, 2, 3, 16, 64, 100, 256, 1024])
def test_cdiv_matches_triton(denominator):
    numerators = [n for n in VALUES if n > 0]
    assert [cdiv(n, denominator) for n in numerators] == [triton.cdiv(n, denominator) for n in numerators]


def test_strides_of_a_missing_input_are_zeros():
    tensor = torch.empty(2, 3, 5).transpose(1, 2)
    assert strides(tensor, 3) == (15, 1, 5)
    assert strides(None, 3) == (0, 0, 0)


def test_document_numbers_and_state_count_from_cu_seqlens():
    cu_seqlens = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    assert document_numbers(cu_seqlens, 7, torch.device("cpu")).tolist() == [[0, 0, 1, 2, 2, 2, 2]]
    assert num_states(1, cu_seqlens) == 3
    assert num_states(4, None) == 4
