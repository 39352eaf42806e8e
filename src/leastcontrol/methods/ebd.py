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
        op = self._flat_operator(system)
        drive = op.drive(x)
        B, n_e = x.shape[0], op.n_state - op.sizes[system.output_population]
        z = (op.pack(free.state) if self.ff_init else x.new_zeros(B, op.n_state)).clone()
        target = self._loss.dense_target(y, z[:, n_e:])
        opt = (torch.optim.Adam([z], lr=self.ebd_lr) if self.ebd_optim == "adam"
               else torch.optim.SGD([z], lr=self.ebd_lr))

        def energy_grad():
            # ∇_s E = (∂_s f)ᵀ f + (1/α) ∇_s L, with L the batch-mean loss (output population last).
            f = op.f(z, drive)
            grad = op.vjp(z, drive, f)
            grad[:, n_e:] += self._loss.dense_grad(z[:, n_e:], target) / (B * self.alpha)
            return f, grad

        for step in range(1, self.ebd_steps + 1):
            z.grad = energy_grad()[1]
            opt.step()
            if step % 50 == 0 and not bool(torch.isfinite(z).all()):
                bad = next(k for k, v in op.unpack(z).items() if not torch.isfinite(v).all())
                raise SolverDivergedError(bad, step, "lcp-ebd optimiser")
        f, grad = energy_grad()
        residual = float(grad.norm() / z.norm().clamp_min(1e-30))
        stats = SolverStats(self.ebd_steps, residual, residual < self.tol, float(residual < self.tol), [residual])
        return ControlledEquilibrium(op.unpack(z.detach().clone()), op.unpack(-f), stats, free)

    def gradients(self, system, x, y):
        free = self.free_equilibrium(system, x)
        ctrl = self.controlled_equilibrium(system, x, y, free)
        grads = local_update(system, x, ctrl)
        loss, acc = self._summary(system.readout(free.state), y)
        stats = two_phase_stats(free, "controlled", SolveResult(ctrl.state, ctrl.stats))
        stats["control_norm"] = float(0.5 * sum(c.pow(2).sum() for c in ctrl.control.values()))
        return MethodOutput(loss, acc, grads, stats)
