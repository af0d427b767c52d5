"""The one place that decides which implementation an op runs: ``backend="auto" | "triton" | "torch"``.

Every public op in ``ssm_hub.ops`` calls :func:`resolve_backend` with its own ``backend`` argument and the tensors
it was given. The environment variable ``SSM_HUB_BACKEND`` overrides ``"auto"`` for the whole process and is read
here only.

- ``"auto"``: Triton when triton imports, the op has a kernel, and the tensors are on a CUDA device; else torch.
- ``"triton"``: the kernel, or a ``NotImplementedError`` saying why not. Under ``TRITON_INTERPRET=1`` (Triton's
  CPU interpreter, used by the CPU test suite) the kernels also run on CPU tensors.
- ``"torch"``: the pure-torch reference, everywhere.
"""

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "SSM_HUB_BACKEND"


def environment_backend() -> str:
    """What ``auto`` means in this process: the value of SSM_HUB_BACKEND, or ``auto`` when it is unset."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:  # a broken install, or an import hook that refuses it
        return False


# Looked up once: the dispatch runs inside torch.compile'd code, where importlib calls break the graph.
_TRITON_AVAILABLE = _find_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreter_enabled() -> bool:
    # Read here as in ssm_hub.kernels.interpreter, not imported from it: ``import ssm_hub`` must not need the kernels
    # package, which a source checkout on sys.path ahead of the installed wheel does not have at ssm_hub.kernels.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op_name: str, backend: str, *tensors, has_triton_kernel: bool = True) -> str:
    """Return ``"torch"`` or ``"triton"`` for one call of ``op_name`` on ``tensors`` (None entries are skipped)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (op {op_name})")
    if backend == "auto":
        backend = environment_backend()
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        usable = has_triton_kernel and on_cuda and triton_available()
        return "triton" if usable else "torch"
    if backend == "triton":
        reason = None
        if not has_triton_kernel:
            reason = "ssm_hub has no Triton kernel for this op yet"
        elif not triton_available():
            reason = "triton is not installed"
        elif not (on_cuda or triton_interpreter_enabled()):
            reason = "the inputs are not CUDA tensors (set TRITON_INTERPRET=1 to run the kernel on the CPU)"
        if reason is not None:
            raise NotImplementedError(
                f"backend='triton' was requested for {op_name}, but {reason}. "
                f"Use backend='torch' or 'auto', or unset {ENV_VAR}."
            )
    return backend
