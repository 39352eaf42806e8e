"""How a solver's steps run: eagerly, as ``torch.compile`` graphs, or as a field's own C steps.

A backend runs the steps between two convergence checks; the driver keeps everything around them
(the checks, the stopping rule, freezing, the check-level mix). Backends are registered by name
(:data:`BACKENDS`); a solver lists the ones it may use in order of preference, and for every run of
steps the driver takes the first that can run it (:meth:`Backend.can_run`), eager being the last
resort. A new backend subclasses :class:`Backend` and registers itself.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Tuple

import torch

from ..errors import ConfigError
from ..registry import Registry


class Backend:
    """Runs a solver's steps with PyTorch operations, one by one (the reference)."""

    name = "eager"

    def can_run(self, solver, field, batch: int, groups) -> bool:
        """Whether this backend can run ``solver``'s next steps of ``field`` on ``batch`` active samples."""
        return True

    def validate(self, solver) -> None:
        """Raise ConfigError at the solver's construction if this backend can never run its steps."""

    def available(self, field, groups) -> bool:
        """Whether this backend has what it needs to run some steps of ``field`` (checked at the start of a solve)."""
        return True

    def gave_way(self) -> bool:
        """Whether this backend has found that it cannot run in this process and said so (a warning): the
        driver then passes over it, as it passes over a backend that cannot run a batch."""
        return False

    def run(self, fn: Callable, *args):
        """Run a pure tensor function (a rule's fused steps, the check-level mix)."""
        return fn(*args)

    def advance(self, solver, field, z, context, carry, n: int, step: int, groups):
        """``n`` steps of ``solver``'s rule from step ``step``: ``(z, residual, carry)``."""
        return solver.advance(field.fn, z, context, carry, n, step, groups, self.run)


# Graphs one process may hold for the compiled steps: one per field (free, controlled, adjoint, ...
# of each method), with or without the mix, and batch regime (a batch of one is compiled apart);
# Dynamo's default is 8.
_COMPILED_GRAPHS = 64


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    """``fn`` through ``torch.compile``, built once per function; the batch dimension is dynamic.
    Fresh closures of the same field code reuse the graph (Dynamo guards on code, not identity)."""
    # Inductor 2.13's lowering of the mix's small batched solve calls a helper it deprecated itself.
    warnings.filterwarnings("ignore", message=r".*torch\._prims_common\.check.*", category=FutureWarning)
    return torch.compile(fn, dynamic=True)


class Compiled(Backend):
    """Runs the steps between two checks, and the check-level mix, as ``torch.compile`` graphs: the
    elementwise work of a step is fused and Python runs once per check, not once per step (same
    iterates up to floating-point order). It pays where a step is many small operations on a small
    batch; each process first spends seconds compiling each field."""

    name = "compile"

    def validate(self, solver) -> None:
        if not type(solver).compilable:
            raise ConfigError(f"backend 'compile' runs rules whose steps are one traceable function (euler); "
                              f"'{solver.name}' is not; drop 'compile' from its backend")

    def run(self, fn, *args):
        import torch._dynamo  # noqa: F401  (its config and exception types)
        try:
            with torch._dynamo.config.patch(recompile_limit=_COMPILED_GRAPHS):
                return _compiled(fn)(*args)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise ConfigError(f"backend 'compile' needs a working torch.compile backend here (for the CPU, a C++ "
                              f"compiler): {type(err.inner_exception).__name__}: {err.inner_exception}; "
                              "drop 'compile' from the solver's backend (method.solver.backend)") from None


class Native(Backend):
    """Runs plain Euler steps of a field that has C steps (``field.kernels["native"]``, see
    :mod:`leastcontrol.native`) on at most ``max_batch`` active samples: the tail of a solve, where a
    PyTorch step costs more in dispatch than in arithmetic. Same iterates up to floating-point order."""

    name = "native"

    def __init__(self, max_batch: int = 16):
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ConfigError(f"native max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = max_batch

    def validate(self, solver) -> None:
        if not type(solver).plain_euler_steps:
            raise ConfigError(f"backend 'native' runs plain Euler steps; '{solver.name}' takes others; "
                              "use the euler solver or drop 'native' from its backend")

    def available(self, field, groups) -> bool:
        kernel = field.kernels.get(self.name)
        return kernel is not None and kernel.supports(groups)

    def gave_way(self) -> bool:
        from .. import native   # C steps that do not build or load here (see native.usable)
        return native.failed()

    def can_run(self, solver, field, batch, groups) -> bool:
        return batch <= self.max_batch and self.available(field, groups)

    def advance(self, solver, field, z, context, carry, n, step, groups):
        z, res = field.kernels[self.name](z, context, solver.dt, n, groups)
        return z, res, carry


BACKENDS: Registry[Backend] = Registry("backend")
BACKENDS.register("eager", Backend)
BACKENDS.register("compile", Compiled)
BACKENDS.register("native", Native)


def check_backends(spec, solver) -> Tuple[Backend, ...]:
    """``spec`` (a name, a backend, or a sequence of them) as backend instances, each validated for ``solver``."""
    items = [spec] if isinstance(spec, (str, Backend)) else list(spec)
    if not items:
        raise ConfigError("backend must name at least one backend (e.g. 'eager')")
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in BACKENDS:
                raise ConfigError(f"unknown backend '{item}'; valid backends: {', '.join(BACKENDS.names())}")
            item = BACKENDS.create(item)
        if not isinstance(item, Backend):
            raise ConfigError(f"a backend is a name or a Backend, got {item!r}")
        item.validate(solver)
        out.append(item)
    return tuple(out)


def pick(backends, solver, field, batch: int, groups) -> Backend:
    """The first of ``backends`` that can run the next steps; eager otherwise."""
    for backend in backends:
        if backend.can_run(solver, field, batch, groups):
            return backend
    return _EAGER


_EAGER = Backend()
