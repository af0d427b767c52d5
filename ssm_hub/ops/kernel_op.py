"""Kernels as torch custom ops that plain eager code calls without going through the dispatcher.

A ``torch.library`` custom op is what lets ``torch.compile`` trace a Triton kernel (through its fake
implementation) and autograd differentiate it (through its registered formula). Outside those, the dispatcher's
path (argument parsing against the schema, the autograd and device layers, the aliasing checks) costs tens of
microseconds a call, which a small model's decode or training step pays a hundred times or more.

:func:`kernel_op` registers the function as a custom op as ``torch.library.custom_op`` does and returns a
:class:`KernelOp`, which calls the function itself when nothing needs the dispatcher: not while compiling or
exporting or FX tracing, not under a dispatch mode (FakeTensorMode, FlopCounterMode, ...), a functorch transform
or forward-mode AD, not for tensor subclasses, and not when autograd has to record the call (grad enabled and an
input that requires grad). Everything else is the op's.
"""

import inspect

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


# The tensor types a kernel reads directly; anything else (a tensor subclass: DTensor, a quantized or wrapper tensor)
# has its own handling of ops and goes through the dispatcher.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _transforms_active() -> bool:
    """A functorch transform (vmap, grad, ...) or a forward-mode AD level is open."""
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd.forward_ad._current_level >= 0


def needs_dispatcher(args) -> bool:
    """Whether a call with these positional arguments must go through the registered op."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or _transforms_active():
        return True
    if torch.overrides.has_torch_function(args):  # FX proxies, __torch_function__ subclasses
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) not in PLAIN_TENSOR_TYPES for t in tensors):
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class KernelOp:
    """A registered custom op (``op``) and the function it wraps, called directly when the dispatcher adds nothing
    (see module). Arguments are positional, as the ops' callers pass them."""

    def __init__(self, name: str, function, mutates_args: tuple[str, ...]):
        self.function = function
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(function)
        # Positions of the arguments the op writes: a direct call bumps their version counters as the op would,
        # so that autograd still notices a tensor it saved being overwritten.
        names = list(inspect.signature(function).parameters)
        self._mutated_positions = [names.index(name) for name in mutates_args]

    def register_fake(self, function):
        return self.op.register_fake(function)

    def register_autograd(self, backward, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if needs_dispatcher(args):
            return self.op(*args)
        result = self.function(*args)
        for position in self._mutated_positions:
            torch.autograd.graph.increment_version(args[position])
        return result


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()):
    """Decorator: register ``function`` as the custom op ``name`` and return its :class:`KernelOp`."""

    def register(function) -> KernelOp:
        return KernelOp(name, function, tuple(mutates_args))

    return register
