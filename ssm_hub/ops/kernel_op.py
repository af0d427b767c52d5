"""Kernels as torch custom ops that plain eager code calls without going through the dispatcher.

A ``torch.library`` custom op is what lets ``torch.compile`` trace a Triton kernel (through its fake
implementation) and autograd differentiate it (through its registered formula). Outside those, the dispatcher's
path (argument parsing against the schema, the autograd and device layers, the aliasing checks) costs tens of
microseconds a call, which a small model's decode or training step pays a hundred times or more.

:func:`kernel_op` registers the function as a custom op as ``torch.library.custom_op`` does and returns a
:class:`KernelOp`, which calls the function itself when nothing needs the dispatcher: not while compiling or
exporting or FX tracing, not under a dispatch mode (FakeTensorMode, FlopCounterMode, ...), a functorch transform
or forward-mode AD, and not for tensor subclasses. Everything else is the op's.

When autograd has to record the call (grad enabled and an input that requires grad), a plain
``torch.autograd.Function`` made of the op's registered formula records it, with the same setup_context, backward
and default arguments as the op's own autograd wrapper. That wrapper re-enters the dispatcher below autograd and
fills defaults from the schema: about 0.2 ms of Python for each of forward and backward, measured on an H100
host, which a training step pays for every norm of every layer.
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
    """Whether a call with these positional arguments must go through the registered op (autograd aside: see
    :func:`records_autograd`)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or _transforms_active():
        return True
    if torch.overrides.has_torch_function(args):  # FX proxies, __torch_function__ subclasses
        return True
    return any(type(a) not in PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


def contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor made contiguous (None stays None), as the kernels read weights, biases and small vectors; a tensor
    that already is (every weight) skips ``.contiguous()``'s trip through the dispatcher, which a decode step would
    otherwise pay a dozen times a layer."""
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]


def records_autograd(args) -> bool:
    """Whether autograd records a call with these positional arguments."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _autograd_function(name: str, function, backward, setup_context) -> type[torch.autograd.Function]:
    """``function`` with the formula registered for its op, as a plain autograd.Function (what the op's own
    autograd wrapper builds, without its trip back through the dispatcher). ``apply`` takes every argument,
    defaults filled in, as setup_context and backward see them there."""

    def forward(ctx, *args):
        output = function(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"Direct{name.replace('::', '_')}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


class KernelOp:
    """A registered custom op (``op``) and the function it wraps, called directly when the dispatcher adds nothing
    (see module). Arguments are positional, as the ops' callers pass them."""

    def __init__(self, name: str, function, mutates_args: tuple[str, ...]):
        self.function = function
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(function)
        # Positions of the arguments the op writes: a direct call bumps their version counters as the op would,
        # so that autograd still notices a tensor it saved being overwritten.
        parameters = inspect.signature(function).parameters
        names = list(parameters)
        self._mutated_positions = [names.index(name) for name in mutates_args]
        self._name = name
        self._defaults = tuple(parameter.default for parameter in parameters.values())
        self._autograd = None

    def register_fake(self, function):
        return self.op.register_fake(function)

    def register_autograd(self, backward, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        if not self._mutated_positions:  # an op that writes its inputs keeps the op's own autograd checks
            self._autograd = _autograd_function(self._name, self.function, backward, setup_context)

    def __call__(self, *args):
        if needs_dispatcher(args):
            return self.op(*args)
        if records_autograd(args):
            if self._autograd is None:
                return self.op(*args)
            return self._autograd.apply(*args, *self._defaults[len(args):])
        result = self.function(*args)
        for position in self._mutated_positions:
            torch.autograd.graph.increment_version(args[position])
        return result


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()):
    """Decorator: register ``function`` as the custom op ``name`` and return its :class:`KernelOp`."""

    def register(function) -> KernelOp:
        return KernelOp(name, function, tuple(mutates_args))

    return register
