"""The one place that decides which implementation an op runs: ``backend="auto" | "triton" | "torch"``.

Every public op in ``ssm_hub.ops`` calls :func:`resolve_backend` with its own ``backend`` argument. The
environment variable ``SSM_HUB_BACKEND`` overrides ``"auto"`` for the whole process and is read here only.
Until the Triton kernels land, no op has a Triton implementation: ``"auto"`` resolves to ``"torch"`` and an
explicit ``"triton"`` raises a clear error naming the op.
"""

import os

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "SSM_HUB_BACKEND"


def _env_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def resolve_backend(op_name: str, backend: str, has_triton_kernel: bool = False) -> str:
    """Return ``"torch"`` or ``"triton"`` for one call of ``op_name``.

    ``has_triton_kernel`` says whether a Triton kernel exists for this op and these inputs (CUDA tensors, a
    supported shape, triton importable); the op computes it, this function applies the policy.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (op {op_name})")
    if backend == "auto":
        backend = _env_backend()
    if backend == "auto":
        return "triton" if has_triton_kernel else "torch"
    if backend == "triton" and not has_triton_kernel:
        raise NotImplementedError(
            f"backend='triton' was requested for {op_name}, but no Triton kernel for it is available here "
            f"(ssm_hub has no Triton kernel for this op yet, or the inputs are not CUDA tensors). "
            f"Use backend='torch' or 'auto', or unset {ENV_VAR}."
        )
    return backend
