"""Kernel launches on the GPU that holds the data.

Triton launches on the *current* CUDA device. With a model on ``cuda:1`` while ``cuda:0`` is current (two models on
two GPUs in one process, or a framework that never sets the device), a launch would read pointers of another
device and fail with "Pointer argument cannot be accessed from Triton". Every custom op that launches kernels is
wrapped by :func:`on_input_device`, which makes its inputs' device current for the call. CPU inputs (the
interpreter) are left alone.
"""

import functools

import torch


def on_input_device(function):
    """``function`` run with the CUDA device of its first tensor argument current (a no-op for CPU tensors)."""

    @functools.wraps(function)
    def run_on_input_device(*args, **kwargs):
        tensor = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if tensor is None or not tensor.is_cuda or tensor.device.index == torch.cuda.current_device():
            # CPU tensors, or already current: switching the device costs more than the launches of a small op.
            return function(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return function(*args, **kwargs)

    return run_on_input_device
