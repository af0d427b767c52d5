"""Host-side helpers for the launchers' grids, block sizes and stride arguments, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s: called from host code, each call unwraps
its arguments through Triton's constexpr machinery, about 2 us on a fast host. A decode step's launchers make a few
hundred such calls, so these are the same integers without that detour. Inside ``@triton.jit`` code, keep using
``tl.cdiv`` and Triton's own helpers.
"""


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for positive ints."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def strides(tensor, ndim: int) -> tuple[int, ...]:
    """``tensor``'s strides, or ``ndim`` zeros for an optional input left out (the kernel never reads it then)."""
    return tensor.stride() if tensor is not None else (0,) * ndim
