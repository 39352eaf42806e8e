"""The interface every learning method implements.

A method is a small object with one job: given a system, an input batch and
targets, compute parameter gradients (with the sign of a loss gradient),
accumulate them into ``.grad`` and return them with statistics. It never owns
the model or the optimizer::

    out = method(system, x, y)      # writes p.grad for every parameter
    optimizer.step()

Every method also offers inference: :meth:`Method.predict` returns the output
population at the free equilibrium. A method that settles the system takes its
solvers as objects, one per phase (:class:`EquilibriumMethod`)::

    LCPDI(free=Euler(tol=1e-4), controlled=Euler(tol=1e-6, max_steps=800))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Tuple

import torch

from ..errors import ConfigError, NonFiniteUpdateError
from ..losses import Loss, get_loss
from ..solvers import Euler, Field, SolveResult, Solver, solver_from_dict
from ..systems.base import AutogradFlatOperator, EquilibriumSystem, FlatOperator

IMPLS = ("fast", "autograd")


@dataclass
class MethodOutput:
    """What one call of a method returns.

    Attributes:
        loss: mean loss at the free equilibrium (the model's prediction).
        accuracy: fraction of correct argmax predictions (classification), else ``None``.
        grads: parameter name -> gradient (same shapes as the parameters).
        stats: solver iterations, convergence flags, control norm, ...
        free_state: the free equilibrium as a flat ``(B, N)`` state, from methods that take a
            ``start`` (:attr:`Method.takes_start`), so a loop can keep it for the next one.
    """

    loss: float
    accuracy: float | None
    grads: Dict[str, torch.Tensor]
    stats: Dict[str, Any] = field(default_factory=dict)
    free_state: torch.Tensor | None = None


def check_finite_update(method: str, grads: Dict[str, torch.Tensor]) -> None:
    """Raise if any of a method's updates holds NaN or Inf (one synchronisation for all of them).

    Raises:
        NonFiniteUpdateError: naming the first such parameter.
    """
    if not grads:
        return
    names = list(grads)
    # A norm is NaN/Inf exactly where its tensor holds one (or overflows, itself a non-finite update).
    finite = torch.isfinite(torch.stack(torch._foreach_norm([grads[n] for n in names])))
    if not bool(finite.all()):
        raise NonFiniteUpdateError(names[int((~finite).nonzero()[0])], None, method)


def _no_native_steps(system) -> str:
    return (f"the native backend covers the recurrent network ('rnn'); {type(system).__name__} has no native steps; "
            "drop 'native' from the solver's backend (method.solver.backend)")


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


def phase_stats(phases: Dict[str, SolveResult]) -> Dict[str, Any]:
    """Statistics of a method's solves, by phase (``free``, ``adjoint``, ``controlled``): the totals
    ``iterations`` (steps of the solves), ``sample_iterations`` (steps per sample) and ``converged``
    (every sample of every phase), and per phase its steps, largest final residual and the fraction
    of samples that converged and stalled."""
    stats: Dict[str, Any] = {
        "iterations": sum(r.stats.steps for r in phases.values()),
        "sample_iterations": sum(r.stats.mean_sample_steps for r in phases.values()),
        "converged": all(r.stats.converged for r in phases.values()),
    }
    for name, res in phases.items():
        s = res.stats
        stats[f"iterations_{name}"] = s.steps
        stats[f"sample_iterations_{name}"] = s.mean_sample_steps
        stats[f"converged_{name}"] = s.converged
        stats[f"residual_{name}"] = s.residual
        stats[f"converged_fraction_{name}"] = s.converged_fraction
        stats[f"stalled_fraction_{name}"] = s.stalled_fraction
        if s.unstable_fraction is not None:   # a solver with check_stability
            stats[f"unstable_fraction_{name}"] = s.unstable_fraction
    return stats


def _check_number(name, value, *, positive=True, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0 or (allow_zero and value == 0)
    if not ok:
        need = "a finite number" + (" >= 0" if allow_zero else " > 0" if positive else "")
        raise ConfigError(f"{name} must be {need}, got {value!r}")


def _plain(value):
    if isinstance(value, Solver):
        return value.to_dict()
    return value


@dataclass
class Method:
    """Base of all methods; holds the loss. Subclasses are dataclasses of their settings."""

    name = "method"
    loss: str = "cross_entropy"

    # Settings that differ by system (and data set) in the published or documented set-ups:
    # model name, or (model, dataset), -> {setting: value} (tables for solvers), applied by the
    # configuration layer under the user's own settings, the (model, dataset) entry last.
    model_defaults: ClassVar[Dict[Any, Dict[str, Any]]] = {}
    # Whether ``gradients`` takes ``start``: a flat state (B, N) where the free phase begins instead of
    # zero (persistent particles); such a method returns the free equilibrium in ``free_state``.
    takes_start: ClassVar[bool] = False

    def __post_init__(self):
        self._loss: Loss = get_loss(self.loss)

    def config(self) -> Dict[str, Any]:
        """The settings as plain data (solvers as their ``to_dict``), for JSON and checkpoints."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    # -- shared helpers -----------------------------------------------------------
    def _inputs(self, system: EquilibriumSystem, x, y):
        x = system.prepare_input(x)
        y = self._loss.check_target(y, system.n_out, x.shape[0]) if y is not None else None
        if y is not None:
            y = y.to(system.device)
        return x, y

    def _summary(self, output: torch.Tensor, y: torch.Tensor):
        """The batch's mean loss, and its accuracy where the targets are classes: indices, or the one-hot
        rows a squared error reads them as (``None`` for other targets)."""
        loss = float(self._loss.value(output, y).mean())
        if y.dim() == 1:
            acc = float((output.argmax(-1) == y).double().mean())
        elif y.dim() == 2 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(-1) == 1).all()):
            acc = float((output.argmax(-1) == y.argmax(-1)).double().mean())
        else:
            acc = None
        return loss, acc

    def __call__(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
                 start: torch.Tensor | None = None) -> MethodOutput:
        """Compute gradients for one batch, accumulate them into ``.grad`` and return them.

        ``start``: where the free phase begins, a flat ``(B, N)`` state (methods with :attr:`takes_start`).

        Raises:
            SolverDivergedError: a solve diverged. ConfigError: a ``start`` for a method that takes none.
        """
        x, y = self._inputs(system, x, y)
        if start is None:
            out = self.gradients(system, x, y)
        elif not self.takes_start:
            raise ConfigError(f"{self.name} starts its free phase from zero and takes no start state; "
                              "persistent states (loop.persistent_states) are for ep and ep-centered")
        else:
            out = self.gradients(system, x, y, start=start)
        check_finite_update(self.name, out.grads)
        accumulate_grads(system, out.grads)
        return out

    def gradients(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor) -> MethodOutput:
        """Gradients on validated inputs, without touching ``.grad``."""
        raise NotImplementedError

    def settled(self, stats: Dict[str, Any]) -> bool:
        """Whether a batch's solves (if any) settled, from its ``stats``."""
        return bool(stats.get("converged", True))

    def settled_samples(self, stats: Dict[str, Any]) -> float:
        """The fraction of a batch's samples whose solves (if any) settled, from its ``stats``."""
        return 1.0 if self.settled(stats) else 0.0

    def check_system(self, system: EquilibriumSystem) -> None:
        """Raise now if this method cannot train ``system`` (a training run asks before its data loads).

        Raises:
            ConfigError or ValueError: naming what the method needs and the fix.
        """

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
    """A method that settles the system with fixed-point solvers, one per phase.

    Args:
        solver: the solver of every phase that has none of its own (default: the method's
            published settings; for LCP Euler to 1e-6 in at most 800 steps, for RBP 1e-4 in 200).
        free: the solver of the free phase (prediction, and where a second phase starts).
        impl: ``fast`` (default): the system's fused flat kernels (closed-form VJPs for the
            built-in networks). ``autograd``: the reference path of the published research code,
            one ``torch.autograd.grad`` per step; its default solver checks every step and does not
            freeze samples, as that code does. Kept for cross-checks and as the speed baseline.

    A phase's solver may be given as a :class:`~leastcontrol.solvers.Solver`, or as a table of changes to
    the solver it would have (``{"tol": 1e-4}``; ``{"name": "anderson", "memory": 6}`` keeps the
    driver settings, tolerances included, and changes the step rule), as a config file writes it.

    Per-model defaults (``model_defaults``: model name, or (model, dataset), -> settings) are the
    published set-ups where a rule's differ between systems; the configuration layer applies them.
    """

    solver: Solver | None = None
    free: Solver | None = None
    impl: str = "fast"

    # The phases whose solvers the method holds (a field of that name each), and those that descend an
    # energy rather than follow the dynamics (their rule is not the dynamics' Euler step).
    phases: ClassVar[Tuple[str, ...]] = ("free",)
    descent_phases: ClassVar[Tuple[str, ...]] = ()

    def default_solver(self) -> Solver:
        """The published solver of this method (Euler, tol 1e-6, at most 800 steps, a check every 10)."""
        return Euler()

    def __post_init__(self):
        super().__post_init__()
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown impl '{self.impl}'; valid: {', '.join(IMPLS)}")
        default = self.default_solver()
        if self.impl == "autograd":   # the research code: a check every step, no freezing
            default = default.replace(check_every=1, freeze=False)
        self.solver = self._as_solver("solver", self.solver, default)
        for phase in self.phases:
            setattr(self, phase, self._as_solver(phase, getattr(self, phase), self.phase_default(phase)))
        if self.impl == "autograd":
            # The research code's path: eager steps, and Euler where it settles the dynamics (an energy
            # route's descent keeps its own rule).
            for phase in ("solver",) + self.phases:
                s = getattr(self, phase)
                euler = type(s).plain_euler_steps or phase in self.descent_phases
                if not euler or [b.name for b in s._backends] != ["eager"]:
                    raise ConfigError(f"impl 'autograd' is the research-code reference and runs eager Euler steps; "
                                      f"got {phase}={s!r}; use impl 'fast' for other solvers and backends")

    def phase_default(self, phase: str) -> Solver:
        """The solver of ``phase`` when none is given: ``solver``."""
        return self.solver

    @staticmethod
    def _as_solver(name: str, value, base: Solver) -> Solver:
        """``value`` as a solver: itself, ``base`` where None, or a table of changes to ``base``."""
        if value is None:
            return base
        if isinstance(value, Solver):
            return value
        try:
            return solver_from_dict(value, base=base)
        except ConfigError as err:
            raise ConfigError(f"method.{name}: {err}") from None

    def solvers(self) -> Dict[str, Solver]:
        """Phase -> its solver."""
        return {phase: getattr(self, phase) for phase in self.phases}

    def settling_phases(self) -> Dict[str, Solver]:
        """The phases that must settle (phase -> solver): all but those run for a fixed budget of steps
        (tol 0: LCP-EBD's optimizer, PC's inference, the EP set-ups of a fixed number of steps), whose
        end is their answer whatever the residual there."""
        return {phase: s for phase, s in self.solvers().items() if s.tol != 0}

    def settled(self, stats: Dict[str, Any]) -> bool:
        """Whether a batch's solves settled (from its ``stats``): every phase of :meth:`settling_phases`
        converged."""
        return all(stats.get(f"converged_{phase}", True) for phase in self.settling_phases())

    def settled_samples(self, stats: Dict[str, Any]) -> float:
        """The fraction of a batch's samples that settled, in the phase of :meth:`settling_phases` where
        the fewest did (from its ``stats``)."""
        return min((stats.get(f"converged_fraction_{phase}", 1.0) for phase in self.settling_phases()), default=1.0)

    def uses_backend(self, name: str) -> bool:
        """Whether any phase's solver may run its steps on the backend ``name``."""
        return any(b.name == name for s in self.solvers().values() for b in s._backends)

    def check_system(self, system: EquilibriumSystem) -> None:
        """The native backend needs a system with C steps (without compiling them).

        Raises:
            ConfigError: the native backend asked for on a system that has none.
        """
        super().check_system(system)
        if self.uses_backend("native") and self.impl != "autograd":
            from .. import native
            if not native.covers(self._flat_operator(system)):
                raise ConfigError(_no_native_steps(system))

    def _flat_operator(self, system: EquilibriumSystem, feedback=None) -> FlatOperator:
        """``f`` and ``(∂_s f)ᵀ a`` on a flat state: the system's fused kernels, or one autograd call (``impl``)."""
        if self.impl == "autograd":
            return AutogradFlatOperator(system, feedback)
        return system.flat_operator(feedback)

    def _kernels(self, system: EquilibriumSystem, op: FlatOperator, kind: str, **constants) -> Dict[str, object]:
        """The backends' own steps of this field (``kind``: ``free``, ``adjoint``, ``controlled``) where a
        phase's solver may use them: the C steps of :mod:`leastcontrol.native` for the systems it covers.

        No steps where the C steps cannot be built or loaded in this process: the solvers then run them on
        their next backend (warned once, :func:`leastcontrol.native.usable`).

        Raises:
            ConfigError: the native backend asked for on a system that has no C steps.
        """
        if not self.uses_backend("native"):
            return {}
        from .. import native
        if not native.covers(op):
            raise ConfigError(_no_native_steps(system))
        if not native.usable():
            return {}
        return {"native": native.field_kernel(op, kind, **constants)}

    @torch.no_grad()
    def free_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, solver: Solver | None = None,
                         start: torch.Tensor | None = None) -> SolveResult:
        """Settle the free dynamics ``ṡ = f(s, θ, x)`` from ``start`` (a flat ``(B, N)`` state), else from
        the zero state, with ``solver``, else ``free``."""
        x = system.prepare_input(x)
        op = self._flat_operator(system)
        if start is None:
            s0 = x.new_zeros(x.shape[0], op.n_state)
        else:
            if tuple(start.shape) != (x.shape[0], op.n_state):
                raise ValueError(f"start must be a flat state of shape {(x.shape[0], op.n_state)}, got {tuple(start.shape)}")
            s0 = start.to(device=x.device, dtype=x.dtype)
        field = Field(lambda s, c: op.f(s, c["drive"]), op.sizes, self._kernels(system, op, "free"))
        res = (solver or self.free).solve(field, s0, {"drive": op.drive(x)})
        state = op.unpack(res.state)
        if system.training:
            system.observe_equilibrium(state)
        return SolveResult(state, res.stats)
