"""Meta-gradient methods behind one interface: ``out = method(problem, omega, batch)``.

Every method returns the gradient of the mean validation loss with respect to
ω (sign of a gradient: ``ω ← ω − η·grad``), averaged over the tasks of the batch:

* ``imaml`` — implicit differentiation: ``λ (H + λI)⁻¹ ∇L_val(φ°)``, solved by
  conjugate gradient on ``(I + H/λ) v = ∇L_val(φ°)`` with Hessian-vector products;
* ``lcp`` — least control: the controlled equilibrium φ* and its control ψ*,
  then the local update ``∇_ω H_β = −λ ψ*`` (scaled by ``1/β``), by dynamic
  inversion (``route="di"``) or by energy minimisation (``route="energy"``);
* ``fomaml`` — first order: ``∇L_val(φ°)``;
* ``contrastive`` — equilibrium propagation: ``λ (φ° − φ_β) / β``, φ_β the
  equilibrium of the nudged objective ``F + β L_val``.

Reference: Meulemans et al., NeurIPS 2022, §5; Rajeswaran et al. 2019 (iMAML);
Zucchet et al. 2021 (contrastive meta-learning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch

from ..errors import ConfigError, SolverDivergedError
from ..registry import Registry
from ..solvers import SolverStats, get_solver
from .problem import InnerProblem, InnerSettings


@dataclass
class TaskBatch:
    """Support ``(x, y)`` and query ``(xq, yq)`` data of T tasks, task dimension first."""

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


@dataclass
class MetaOutput:
    """A meta-gradient ``(P,)``, the mean post-adaptation validation loss and statistics."""

    grad: torch.Tensor
    val_loss: float
    stats: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MetaMethod:
    """Base of the meta-gradient methods; holds the inner solver settings."""

    name = "meta"
    inner: InnerSettings = field(default_factory=InnerSettings)

    def adapt(self, problem: InnerProblem, omega: torch.Tensor, batch: TaskBatch):
        """The free equilibrium φ° of every task (the adapted learner)."""
        return problem.equilibrium(omega, batch.x, batch.y, self.inner)

    def __call__(self, problem: InnerProblem, omega: torch.Tensor, batch: TaskBatch) -> MetaOutput:
        free = self.adapt(problem, omega, batch)
        with torch.no_grad():
            val = problem.losses(free.state, batch.xq, batch.yq)
        if not bool(torch.isfinite(val).all()):
            raise SolverDivergedError("phi", free.stats.iterations, "inner solver (lower --inner-lr)")
        grad, stats = self.meta_gradient(problem, omega, batch, free.state)
        stats.update(inner_iterations=free.stats.iterations, inner_residual=free.stats.residual)
        return MetaOutput(grad, float(val.mean()), stats)

    def meta_gradient(self, problem, omega, batch, phi):
        raise NotImplementedError


@dataclass
class FOMAML(MetaMethod):
    """First-order: the validation gradient at the adapted weights, ``∇L_val(φ°)``."""

    name = "fomaml"

    def meta_gradient(self, problem, omega, batch, phi):
        with torch.no_grad():
            return problem.grads(phi, batch.xq, batch.yq).mean(0), {}


@dataclass
class IMAML(MetaMethod):
    """Implicit MAML: conjugate gradient on ``(I + H/λ) v = ∇L_val(φ°)``, ``cg_steps`` iterations."""

    name = "imaml"
    cg_steps: int = 10

    def meta_gradient(self, problem, omega, batch, phi):
        with torch.no_grad():
            g = problem.grads(phi, batch.xq, batch.yq)

            def A(v):
                return v + problem.hvp(phi, batch.x, batch.y, v) / problem.lam

            v = torch.zeros_like(g)
            r = g.clone()
            p = r.clone()
            rr = (r * r).sum(1, keepdim=True)
            for _ in range(self.cg_steps):
                Ap = A(p)
                pAp = (p * Ap).sum(1, keepdim=True)
                # A task whose system is not positive along p (or has converged) stops moving.
                alpha = torch.where(pAp > 1e-30, rr / pAp.clamp_min(1e-30), torch.zeros_like(pAp))
                v = v + alpha * p
                r = r - alpha * Ap
                rr_new = (r * r).sum(1, keepdim=True)
                p = r + (rr_new / rr.clamp_min(1e-30)) * p
                rr = rr_new
            residual = float((rr.sqrt() / (g * g).sum(1, keepdim=True).sqrt().clamp_min(1e-30)).max())
        return v.mean(0), {"cg_residual": residual}


@dataclass
class ControlledMetaEquilibrium:
    phi: torch.Tensor
    psi: torch.Tensor
    stats: SolverStats


@dataclass
class LCPMeta(MetaMethod):
    """Least-control meta-learning.

    The controlled equilibrium minimises ``½‖f(φ)‖² + β L_val(φ)``; its control
    ``ψ* = −f(φ*) = ∇L_train(φ*) + λ(φ* − ω)`` gives the local meta-update

        ∇_ω H_β = −(∂_ω f)ᵀ ψ* = −λ ψ*,      returned divided by β,

    which tends to the implicit (iMAML) meta-gradient as β → 0.

    Args:
        beta: control strength β.
        route: ``di`` — dynamic inversion, ``φ̇ = f + ψ``, ``ψ̇ = (∂_φ f)ᵀ ψ − β ∇L_val(φ)``
            (one Hessian-vector product per step, Euler with the inner step size);
            ``energy`` — Adam on the energy over φ for ``energy_steps`` steps.
        tol, max_iter: of the controlled solve (``di``).
    """

    name = "lcp"
    beta: float = 0.1
    route: str = "di"
    tol: float = 1e-5
    max_iter: int = 500
    energy_steps: int = 300
    energy_lr: float = 1e-3

    def __post_init__(self):
        if self.route not in ("di", "energy"):
            raise ConfigError(f"unknown lcp route '{self.route}'; valid: di, energy")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")

    def controlled_equilibrium(self, problem: InnerProblem, omega, batch: TaskBatch, phi_free) -> ControlledMetaEquilibrium:
        """``(φ*, ψ*)`` from the free equilibrium: no inner trajectory is kept."""
        T = phi_free.shape[0]
        omega_t = omega.detach().expand(T, -1)
        if self.route == "energy":
            return self._energy(problem, omega_t, batch, phi_free)

        def field(s, c):
            f = problem.field(s["phi"], c["omega"], c["x"], c["y"])
            # (∂_φ f)ᵀ ψ = −(H + λI) ψ: one Hessian-vector product.
            back = -problem.hvp(s["phi"], c["x"], c["y"], s["psi"]) - problem.lam * s["psi"]
            return {"phi": f + s["psi"], "psi": back - self.beta * problem.grads(s["phi"], c["xq"], c["yq"])}

        solver = get_solver("euler", dt=self.inner.lr, tol=self.tol, max_iter=self.max_iter, check_every=5)
        context = {"omega": omega_t, "x": batch.x, "y": batch.y, "xq": batch.xq, "yq": batch.yq}
        with torch.no_grad():
            res = solver.solve(field, {"phi": phi_free.clone(), "psi": torch.zeros_like(phi_free)}, context)
        # At the equilibrium ψ* = −f(φ*). The controller's own state is used: it starts at zero, so an
        # inexact free equilibrium (f(φ°) ≠ 0) does not leak into the control.
        return ControlledMetaEquilibrium(res.state["phi"], res.state["psi"], res.stats)

    def _energy(self, problem, omega_t, batch, phi_free) -> ControlledMetaEquilibrium:
        phi = phi_free.detach().clone()
        opt = torch.optim.Adam([phi], lr=self.energy_lr)
        with torch.no_grad():
            for step in range(1, self.energy_steps + 1):
                f = problem.field(phi, omega_t, batch.x, batch.y)
                # ∇E = (∂f)ᵀ f + β ∇L_val = −(H + λI) f + β ∇L_val
                phi.grad = (-problem.hvp(phi, batch.x, batch.y, f) - problem.lam * f
                            + self.beta * problem.grads(phi, batch.xq, batch.yq))
                opt.step()
            if not bool(torch.isfinite(phi).all()):
                raise SolverDivergedError("phi", step, "lcp energy route (lower --energy-lr)")
            # ψ* = −f(φ*), measured against the free equilibrium's own residual.
            psi = problem.field(phi_free, omega_t, batch.x, batch.y) - problem.field(phi, omega_t, batch.x, batch.y)
        r = float(phi.grad.norm(dim=1).max())
        return ControlledMetaEquilibrium(phi, psi, SolverStats(self.energy_steps, r, False, 0.0, [r]))

    @staticmethod
    def local_update(problem: InnerProblem, ctrl: ControlledMetaEquilibrium, beta: float) -> torch.Tensor:
        """``−λ ψ* / β`` averaged over tasks: the meta-update from the controlled equilibrium alone."""
        return (-problem.lam * ctrl.psi / beta).mean(0)

    def meta_gradient(self, problem, omega, batch, phi):
        ctrl = self.controlled_equilibrium(problem, omega, batch, phi)
        stats = {"controlled_iterations": ctrl.stats.iterations, "controlled_residual": ctrl.stats.residual,
                 "control_norm": float(ctrl.psi.norm(dim=1).mean())}
        return self.local_update(problem, ctrl, self.beta), stats


@dataclass
class Contrastive(MetaMethod):
    """Equilibrium propagation: ``λ (φ° − φ_β) / β`` with φ_β the nudged equilibrium (warm-started at φ°)."""

    name = "contrastive"
    beta: float = 0.1

    def meta_gradient(self, problem, omega, batch, phi):
        nudged = problem.equilibrium(omega, batch.x, batch.y, self.inner, start=phi, nudge=self.beta,
                                     xq=batch.xq, yq=batch.yq)
        return (problem.lam * (phi - nudged.state) / self.beta).mean(0), {"nudged_iterations": nudged.stats.iterations}


META_METHODS: Registry[MetaMethod] = Registry("meta method")
META_METHODS.register("lcp", LCPMeta)
META_METHODS.register("imaml", IMAML)
META_METHODS.register("fomaml", FOMAML)
META_METHODS.register("contrastive", Contrastive)


def get_meta_method(name: str, **settings) -> MetaMethod:
    """Build a meta-gradient method by name (``lcp``, ``imaml``, ``fomaml``, ``contrastive``)."""
    return META_METHODS.create(name, **settings)
