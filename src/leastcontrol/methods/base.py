"""The interface every learning method implements.

A method is a small object with one job: given a system, an input batch and
targets, compute parameter gradients (with the sign of a loss gradient),
accumulate them into ``.grad`` and return them with statistics. It never owns
the model or the optimizer::

    out = method(system, x, y)      # writes p.grad for every parameter
    optimizer.step()

Every method also offers inference: :meth:`Method.predict` returns the output
population at the free equilibrium.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict

import torch

from ..errors import ConfigError
from ..losses import Loss, get_loss
from ..solvers import SOLVERS, SolveResult, get_solver
from ..systems.base import AutogradFlatOperator, EquilibriumSystem, FlatOperator

IMPLS = ("fast", "autograd")
# Solver settings every EquilibriumMethod passes itself (see ``_make_solver``).
_METHOD_SOLVER_SETTINGS = ("dt", "tol", "max_iter", "check_every", "patience", "stall_tol", "groups", "compile")


@dataclass
class MethodOutput:
    """What one call of a method returns.

    Attributes:
        loss: mean loss at the free equilibrium (the model's prediction).
        accuracy: fraction of correct argmax predictions (classification), else ``None``.
        grads: parameter name -> gradient (same shapes as the parameters).
        stats: solver iterations, convergence flags, control norm, ...
    """

    loss: float
    accuracy: float | None
    grads: Dict[str, torch.Tensor]
    stats: Dict[str, Any] = field(default_factory=dict)


def accumulate_grads(system: EquilibriumSystem, grads: Dict[str, torch.Tensor]) -> None:
    """Add ``grads`` into ``p.grad`` (like ``loss.backward()`` does), creating it where absent.

    Updates are cast to the parameter's dtype (under bf16 autocast a VJP may come back in bf16).
    """
    for name, p in system.named_parameters():
        g = grads.get(name)
        if g is None or not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype, copy=True)
        else:
            p.grad.add_(g.detach().to(p.dtype))


def two_phase_stats(free: SolveResult, phase: str, second: SolveResult) -> Dict[str, Any]:
    """Statistics of a free solve followed by a second one (``adjoint`` or ``controlled``)."""
    stats: Dict[str, Any] = {
        "iterations": free.stats.iterations + second.stats.iterations,
        "sample_iterations": (free.stats.mean_sample_iterations or free.stats.iterations)
        + (second.stats.mean_sample_iterations or second.stats.iterations),
        "converged": free.stats.converged and second.stats.converged,
    }
    for name, res in (("free", free), (phase, second)):
        stats[f"iterations_{name}"] = res.stats.iterations
        stats[f"sample_iterations_{name}"] = res.stats.mean_sample_iterations or res.stats.iterations
        stats[f"converged_{name}"] = res.stats.converged
        stats[f"residual_{name}"] = res.stats.residual
        stats[f"converged_fraction_{name}"] = res.stats.converged_fraction
        stats[f"stalled_fraction_{name}"] = res.stats.stalled_fraction
        if res.stats.unstable_fraction is not None:   # solver_options={"check_stability": True}
            stats[f"unstable_fraction_{name}"] = res.stats.unstable_fraction
    return stats


def _check_number(name, value, *, positive=True, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0 or (allow_zero and value == 0)
    if not ok:
        need = "a finite number" + (" >= 0" if allow_zero else " > 0" if positive else "")
        raise ConfigError(f"{name} must be {need}, got {value!r}")


@dataclass
class Method:
    """Base of all methods; holds the loss. Subclasses are dataclasses of their settings."""

    name = "method"
    loss: str = "cross_entropy"

    def __post_init__(self):
        self._loss: Loss = get_loss(self.loss)

    def config(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- shared helpers -----------------------------------------------------------
    def _inputs(self, system: EquilibriumSystem, x, y):
        x = system.prepare_input(x)
        y = self._loss.check_target(y, system.n_out, x.shape[0]) if y is not None else None
        if y is not None:
            y = y.to(system.device)
        return x, y

    def _summary(self, output: torch.Tensor, y: torch.Tensor):
        loss = float(self._loss.value(output, y).mean())
        acc = float((output.argmax(-1) == y).double().mean()) if self.loss == "cross_entropy" else None
        return loss, acc

    def __call__(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor) -> MethodOutput:
        """Compute gradients for one batch, accumulate them into ``.grad`` and return them."""
        x, y = self._inputs(system, x, y)
        out = self.gradients(system, x, y)
        accumulate_grads(system, out.grads)
        return out

    def gradients(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor) -> MethodOutput:
        """Gradients on validated inputs, without touching ``.grad``."""
        raise NotImplementedError

    def prepare(self, system: EquilibriumSystem, generator: torch.Generator | None = None) -> None:
        """Add what the method needs to the system (e.g. feedback weights); call before making the optimizer.

        ``generator`` draws any random start (default: PyTorch's global generator).
        """

    def after_step(self, system: EquilibriumSystem) -> None:
        """Hook to call after each optimizer step (e.g. weight decay of Kolen-Pollack)."""

    @torch.no_grad()
    def predict(self, system: EquilibriumSystem, x: torch.Tensor) -> torch.Tensor:
        """Output population (logits) at the free equilibrium, shape ``(B, n_out)``."""
        return system.readout(self.free_equilibrium(system, x).state)

    def free_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor) -> SolveResult:
        raise NotImplementedError


@dataclass
class EquilibriumMethod(Method):
    """A method that settles the system with a fixed-point solver.

    Args:
        dt: Euler step (τ = 1 for every population).
        tol: relative-residual tolerance of every solve.
        max_iter: maximum steps of every solve.
        solver: ``euler`` or ``anderson`` (see :mod:`leastcontrol.solvers`).
        check_every: test convergence every k steps (each test costs norms and a sync).
        impl: ``fast`` (default): the system's fused flat kernels (closed-form VJPs for the
            built-in networks), convergence checked every ``check_every`` steps, converged
            samples frozen. ``autograd``: the reference path of the published research
            code — one ``torch.autograd.grad`` per step, a check (host sync) every step,
            no freezing; kept for cross-checks and as the speed baseline.
        patience, stall_tol: the solvers' stall rule (off by default): a sample whose residual
            has not fallen by 10 % in ``patience`` steps stops, if below ``stall_tol``. For dynamics
            that chatter at a floor above ``tol`` (ReLU kinks of the conv FF's controlled
            dynamics); see :class:`~leastcontrol.solvers.Solver`.
        compile: run the ``check_every`` Euler steps between two convergence checks as one
            ``torch.compile`` graph (``euler`` solver, ``impl='fast'``; off by default). The first
            solve of each phase compiles, for seconds; see ``docs/performance.md`` for when it pays.
        native: run the Euler steps of the last few active samples of a solve (at most the solver's
            ``native_batch``, default 16), convergence checks included, as one C loop instead of
            PyTorch operations (:mod:`leastcontrol.native`): the free phase, RBP's adjoint and the
            controlled phase of LCP-DI/KP, on the recurrent network, on the CPU. Same field, same
            stopping rule, iterates equal up to floating-point order. At a few samples each PyTorch
            operation costs more in dispatch than in arithmetic, and the tail of a solve is many such
            steps. Off by default; needs a C compiler (built once into the user cache).
        solver_options: further keyword settings of the solver, for every solve (e.g.
            ``{"warmup": 100, "memory": 10}`` for ``anderson``); checked at construction.
    """

    dt: float = 1.0
    tol: float = 1e-6
    max_iter: int = 800
    solver: str = "euler"
    check_every: int = 10
    impl: str = "fast"
    patience: int | None = None
    stall_tol: float | None = None
    solver_options: Dict[str, Any] | None = None
    compile: bool = False
    native: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_number("dt", self.dt)
        if self.solver_options is not None and not isinstance(self.solver_options, dict):
            raise ConfigError(f"solver_options must be a dict of solver settings, got {self.solver_options!r}")
        owned = sorted(set(self.solver_options or {}) & set(_METHOD_SOLVER_SETTINGS))
        if owned:
            # The method sets these on every solver it builds; taking them here would drop one silently.
            raise ConfigError(f"solver_options {owned} are the method's own settings; pass them as the method's "
                              f"fields ({', '.join(owned)}=...) instead")
        _check_number("tol", self.tol, allow_zero=True)
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.solver not in SOLVERS:
            SOLVERS.factory(self.solver)  # raises, listing the valid names
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown impl '{self.impl}'; valid: {', '.join(IMPLS)}")
        if self.impl == "autograd" and self.solver != "euler":
            raise ConfigError("impl 'autograd' is the research-code reference and runs the euler solver only; "
                              "use impl 'fast' for other solvers")
        for flag in ("compile", "native"):   # two ways of running the Euler steps faster
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ConfigError(f"{flag} must be True or False, got {value!r}")
            if value and (self.solver != "euler" or self.impl != "fast"):
                raise ConfigError(f"{flag} runs the euler solver's steps on the fast path; got solver "
                                  f"'{self.solver}', impl '{self.impl}' (use solver 'euler', impl 'fast', or drop {flag})")
        self._solver = self._make_solver(self.tol)

    def _make_solver(self, tol: float, groups=None, **defaults):
        """The solver of one phase at ``tol``; ``defaults``: settings of this phase that the user's
        ``solver_options`` override."""
        options = {**defaults, **(self.solver_options or {}), "check_every": self.check_every,
                   "patience": self.patience, "stall_tol": self.stall_tol, "groups": groups}
        if self.impl == "autograd":
            options.update(check_every=1, freeze=False)
        if self.compile:
            options["compile"] = True
        try:
            return get_solver(self.solver, dt=self.dt, tol=tol, max_iter=self.max_iter, **options)
        except TypeError as err:
            raise ConfigError(f"solver_options {self.solver_options} do not fit the '{self.solver}' solver ({err}); "
                              "its settings are the keyword arguments of its class in leastcontrol.solvers") from None

    def _flat_operator(self, system: EquilibriumSystem, feedback=None) -> FlatOperator:
        """``f`` and ``(∂_s f)ᵀ a`` on a flat state: the system's fused kernels, or one autograd call (``impl``)."""
        if self.impl == "autograd":
            return AutogradFlatOperator(system, feedback)
        return system.flat_operator(feedback)

    def _native_steps(self, system: EquilibriumSystem, op: FlatOperator, phase: str, **settings):
        """With ``native``, the C steps of this phase's field (:meth:`FlatOperator.native_steps`), else None.

        Raises:
            ConfigError: ``native`` on a system that has no C steps.
        """
        if not self.native:
            return None
        steps = op.native_steps(phase, **settings)
        if steps is None:
            raise ConfigError(f"native=True covers the recurrent network ('rnn'); {type(system).__name__} has no "
                              "native steps; run without native")
        return steps

    def _solve(self, field, state0, context: Dict[str, Any], solver=None, labels=None):
        """Run the solver on ``field(s, context)``; the context is batch-aligned data.

        When every context entry is a batch-first tensor the solver may subset it
        (freezing converged samples); otherwise it is bound into a closure.
        """
        solver = solver or self._solver
        B = next(iter(state0.values())).shape[0]
        if all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B for v in context.values()):
            return solver.solve(field, state0, context, labels)
        return solver.solve(lambda s: field(s, context), state0, None, labels)

    def _solve_flat(self, field, z0: torch.Tensor, context: Dict[str, Any], solver=None,
                    populations: Dict[str, int] | None = None, native_steps=None) -> SolveResult:
        """:meth:`_solve` on one flat ``(B, N)`` buffer; ``field(z, context)`` returns ``ż``.

        ``populations`` (name -> width, in buffer order) names the culprit if the solve diverges.
        ``native_steps``: the same field's steps in C (:mod:`leastcontrol.native`), which the Euler
        solver runs on the last few active samples.
        """
        labels = {"z": list(populations.items())} if populations else None

        def flat_field(d, c):
            return {"z": field(d["z"], c)}
        flat_field.native_steps = native_steps
        res = self._solve(flat_field, {"z": z0}, context, solver, labels)
        return SolveResult(res.state["z"], res.stats)

    @torch.no_grad()
    def free_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, solver=None) -> SolveResult:
        """Settle the free dynamics ``ṡ = f(s, θ, x)`` from the zero state (with ``solver``, else the method's)."""
        x = system.prepare_input(x)
        op = self._flat_operator(system)
        s0 = x.new_zeros(x.shape[0], op.n_state)
        res = self._solve_flat(lambda s, c: op.f(s, c["drive"]), s0, {"drive": op.drive(x)}, solver, op.sizes,
                               native_steps=self._native_steps(system, op, "free"))
        state = op.unpack(res.state)
        if system.training:
            system.observe_equilibrium(state)
        return SolveResult(state, res.stats)
