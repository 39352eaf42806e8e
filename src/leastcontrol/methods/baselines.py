"""Gradient baselines: backprop through the layered forward pass, and recurrent backprop."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch

from ..errors import ConfigError
from ..solvers import Euler, Field, SolveResult, Solver, SolveStats, Status
from ..systems.base import EquilibriumSystem
from .base import EquilibriumMethod, Method, MethodOutput, _check_number, phase_stats


def _exact(batch: int, steps: int) -> SolveStats:
    """The stats of an unrolled pass that reaches the equilibrium exactly in ``steps`` steps."""
    return SolveStats(steps, torch.full((batch,), int(Status.CONVERGED)), torch.full((batch,), steps),
                      torch.zeros(batch, dtype=torch.float64))


@dataclass
class BP(Method):
    """Backpropagation for feedforward equilibria.

    Unrolls ``settle_steps`` (depth + 1) Euler steps with ``dt = 1`` from the
    zero state — exactly the layered forward pass — and differentiates the
    mean loss through them with autograd.

    Raises:
        ValueError: on a system that is not layered (use ``rbp`` or ``lcp-di``).
    """

    name = "bp"

    def _steps(self, system: EquilibriumSystem) -> int:
        if not system.is_feedforward:
            raise ValueError(
                f"bp needs a feedforward (layered) system, but {type(system).__name__} is recurrent; "
                "use --method rbp or lcp-di"
            )
        return system.settle_steps

    def check_system(self, system: EquilibriumSystem) -> None:
        self._steps(system)

    def _unroll(self, system, x):
        drive = system.encode(x)
        s = system.init_state(x.shape[0])
        for _ in range(self._steps(system)):
            f = system.dynamics(s, drive)
            s = {k: s[k] + f[k] for k in s}
        return s

    def gradients(self, system, x, y):
        named = [(n, p) for n, p in system.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            out = system.readout(self._unroll(system, x))
            loss = self._loss.value(out, y).mean()
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
        loss_value, acc = self._summary(out.detach(), y)
        steps = self._steps(system)
        return MethodOutput(loss_value, acc, grads, {"iterations": steps, "iterations_free": steps,
                                                     "converged": True})

    @torch.no_grad()
    def free_equilibrium(self, system, x) -> SolveResult:
        x = system.prepare_input(x)
        steps = self._steps(system)
        return SolveResult(self._unroll(system, x), _exact(x.shape[0], steps))


@dataclass
class BPTT(EquilibriumMethod):
    """Backpropagation through time over a fixed number of Euler steps.

    Unrolls ``steps`` Euler steps of size ``dt`` of the free dynamics from the zero state with
    autograd and differentiates the mean loss at the last state. Memory grows linearly with the
    number of steps (every intermediate state is stored) — the cost that implicit differentiation
    and LCP avoid; kept as a baseline. Prediction settles the free dynamics with ``free``.
    """

    name = "bptt"
    steps: int = 100
    dt: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        _check_number("dt", self.dt)

    def gradients(self, system, x, y):
        named = [(n, p) for n, p in system.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            drive = system.encode(x)
            s = system.init_state(x.shape[0])
            for _ in range(self.steps):
                f = system.dynamics(s, drive)
                s = {k: s[k] + self.dt * f[k] for k in s}
            out = system.readout(s)
            grads = torch.autograd.grad(self._loss.value(out, y).mean(), [p for _, p in named], allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
        loss, acc = self._summary(out.detach(), y)
        return MethodOutput(loss, acc, grads, {"iterations": self.steps, "iterations_free": self.steps,
                                               "converged": True})


@dataclass
class RBP(EquilibriumMethod):
    """Recurrent backpropagation (implicit differentiation).

    1. free equilibrium ``f(s°) = 0``;
    2. adjoint fixed point ``λ̇ = (∂_s f)ᵀ λ + ∇_s L`` (VJPs only, no graph
       kept across iterations), so ``(∂_s f)ᵀ λ* = −∇_s L``;
    3. one VJP in θ: ``∇_θ L(s°) = (∂_θ f(s°))ᵀ λ*``.

    Defaults are the published RNN settings (Euler, tol 1e-4, at most 200 steps). The adjoint
    dynamics are linear in λ: with an Anderson ``solver`` and no ``adjoint`` of its own, the adjoint
    phase is accelerated from its first step (``start_below`` ∞).
    """

    name = "rbp"
    adjoint: Solver | None = None

    phases: ClassVar[Tuple[str, ...]] = ("free", "adjoint")

    def default_solver(self) -> Solver:
        return Euler(tol=1e-4, max_steps=200)

    def phase_default(self, phase):
        # The adjoint dynamics are linear in λ: there is no basin for the plain dynamics to choose,
        # so Anderson accelerates them from the first step (start_below ∞). That also settles the
        # adjoint at a fixed point whose Euler dynamics are unstable (Anderson can settle the free
        # phase on one), where the plain adjoint dynamics grow without end.
        if phase == "adjoint" and hasattr(self.solver, "start_below"):
            return self.solver.replace(start_below=math.inf)
        return super().phase_default(phase)

    @torch.no_grad()
    def adjoint_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, state, y: torch.Tensor) -> SolveResult:
        """Solve ``(∂_s f(s°))ᵀ λ = −∇_s L(s°)`` by the adjoint dynamics; ``state`` is ``s°``."""
        B = x.shape[0]
        # The per-sample loss gradient; dividing by B makes λ the adjoint of the batch mean.
        dL = self._loss.grad(system.readout(state), y) / B
        op = self._flat_operator(system)
        s = op.pack(state)
        dL_flat = torch.cat([s.new_zeros(B, op.n_state - dL.shape[1]), dL], dim=1)  # output population last
        drive = op.drive(x)
        # The state is fixed during the adjoint dynamics: its slopes are computed once, not per step.
        field = Field(lambda lam, c: op.vjp_at(c["lin"], c["drive"], lam).add_(c["dL"]), op.sizes,
                      self._kernels(system, op, "adjoint"))
        res = self.adjoint.solve(field, torch.zeros_like(s), {"drive": drive, "dL": dL_flat, "lin": op.linearize(s, drive)})
        return SolveResult(op.unpack(res.state), res.stats)

    def gradients(self, system, x, y):
        free = self.free_equilibrium(system, x)
        adj = self.adjoint_equilibrium(system, x, free.state, y)
        grads = system.param_vjp(free.state, x, adj.state)
        loss, acc = self._summary(system.readout(free.state), y)
        return MethodOutput(loss, acc, grads, phase_stats({"free": free, "adjoint": adj}))
