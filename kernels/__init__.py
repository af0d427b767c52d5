"""Triton kernels (``@triton.jit`` functions and their launchers), shipped as ``ssm_hub.kernels``.

No autograd and no dispatch here: ``ssm_hub.ops`` registers the launchers as torch custom ops and decides, through
``ssm_hub.backend``, when they run; the kernels import nothing of ssm_hub outside this package. Importing a kernel
module needs triton (``interpreter`` does not); ``import ssm_hub`` does not.

The folder sits at the top of the repository, so Python run from the repository root (``python -c``, ``python -m``)
finds it as a top-level ``kernels`` module, the name of Hugging Face's kernels package, which transformers imports.
Imported under that name, this module hands the name over: it loads Hugging Face's package from the rest of
sys.path in its place, or fails as a missing module would.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _checkout = Path(__file__).resolve().parent.parent
    _elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is ssm_hub.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns what sys.modules holds under the name once this module has run.
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
