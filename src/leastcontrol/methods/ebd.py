"""LCP with the energy-based route (LCP-EBD).

Instead of running controller dynamics, minimise the relaxed least-control
energy directly in state space with a gradient optimiser,

    E(s) = ½‖f(s, θ)‖² + (1/α) L(s),       ∇_s E = (∂_s f)ᵀ f + (1/α) ∇_s L,

then read the control off the minimiser, ``ψ* = −f(s*)``, and apply the same
local update as every LCP route, ``∇_θ H_β = −(∂_θ f(s*))ᵀ ψ*`` with ``β = 1/α``.
As elsewhere ``½‖f‖²`` sums over the batch and ``L`` is the batch-mean loss.

Reference: Meulemans et al., NeurIPS 2022, §3 (energy-based dynamics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, SolverDivergedError
from ..solvers import SolveResult, SolverStats
from ..systems.base import EquilibriumSystem
from .base import EquilibriumMethod, MethodOutput, _check_number, two_phase_stats
from .lcp import ControlledEquilibrium, local_update


@dataclass
class LCPEBD(EquilibriumMethod):
    """LCP by direct minimisation of ``½‖f‖² + (1/α) L`` over the state.

    Args:
        alpha: control strength is ``β = 1/α``.
        ebd_optim: ``adam`` or ``sgd`` on the state.
        ebd_lr: its learning rate.
        ebd_steps: number of optimiser steps.
        ff_init: start from the free equilibrium (else from the zero state).
        dt, tol, max_iter, solver: settings of the free solve (prediction, ``ff_init``).
    """

    name = "lcp-ebd"
    alpha: float = 0.1
    ebd_optim: str = "adam"
    ebd_lr: float = 0.01
    ebd_steps: int = 800
    ff_init: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_number("alpha", self.alpha)
        _check_number("ebd_lr", self.ebd_lr)
        if self.ebd_optim not in ("adam", "sgd"):
            raise ConfigError(f"unknown ebd_optim '{self.ebd_optim}'; valid: adam, sgd")
        if not (isinstance(self.ebd_steps, int) and self.ebd_steps >= 1):
            raise ConfigError(f"ebd_steps must be a positive integer, got {self.ebd_steps!r}")

    @property
    def beta(self) -> float:
        return 1.0 / self.alpha

    @torch.no_grad()
    def controlled_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
                               free: SolveResult | None = None) -> ControlledEquilibrium:
        """Minimise the energy from the free equilibrium (``ff_init``) or from zero."""
        x = system.prepare_input(x)
        free = free if free is not None else self.free_equilibrium(system, x)
        drive = system.encode(x)
        out = system.output_population
        B = x.shape[0]
        start = free.state if self.ff_init else system.init_state(B)
        state = {k: v.clone() for k, v in start.items()}
        params = list(state.values())
        opt = (torch.optim.Adam(params, lr=self.ebd_lr) if self.ebd_optim == "adam"
               else torch.optim.SGD(params, lr=self.ebd_lr))

        vjp = self._dynamics_and_vjp(system)

        def energy_grad():
            # ∇_s E = (∂_s f)ᵀ f + (1/α) ∇_s L, with L the batch-mean loss.
            f = system.dynamics(state, drive)
            grad = vjp(state, drive, f)[1]
            grad[out] = grad[out] + self._loss.grad(state[out], y) / (B * self.alpha)
            return f, grad

        for step in range(1, self.ebd_steps + 1):
            _, grad = energy_grad()
            for k, p in state.items():
                p.grad = grad[k]
            opt.step()
            if step % 50 == 0 and not all(torch.isfinite(p).all() for p in params):
                bad = next(k for k, p in state.items() if not torch.isfinite(p).all())
                raise SolverDivergedError(bad, step, "lcp-ebd optimiser")
        f, grad = energy_grad()
        scale = sum(v.pow(2).sum() for v in state.values()).sqrt().clamp_min(1e-30)
        residual = float(sum(g.pow(2).sum() for g in grad.values()).sqrt() / scale)
        stats = SolverStats(self.ebd_steps, residual, residual < self.tol, float(residual < self.tol), [residual])
        control = {k: -v for k, v in f.items()}
        return ControlledEquilibrium({k: v.detach() for k, v in state.items()}, control, stats, free)

    def gradients(self, system, x, y):
        free = self.free_equilibrium(system, x)
        ctrl = self.controlled_equilibrium(system, x, y, free)
        grads = local_update(system, x, ctrl)
        loss, acc = self._summary(system.readout(free.state), y)
        stats = two_phase_stats(free, "controlled", SolveResult(ctrl.state, ctrl.stats))
        stats["control_norm"] = float(0.5 * sum(c.pow(2).sum() for c in ctrl.control.values()))
        return MethodOutput(loss, acc, grads, stats)
