"""Meta-gradient methods behind one interface: ``out = method(problem, omega, batch)``.

Every method returns the gradient of the mean validation loss with respect to
ω (sign of a gradient: ``ω ← ω − η·grad``), averaged over the tasks of the batch,
and, with ``learn_lam=True``, with respect to a per-weight pull λ (Λ = diag λ):

* ``imaml`` — implicit differentiation: with ``u = (H + Λ)⁻¹ ∇L_val(φ°)`` (conjugate
  gradient with Hessian-vector products), ``∇_ω = Λ u`` and ``∇_λ = −(φ° − ω) ⊙ u``;
* ``lcp`` — least control: the controlled equilibrium φ* and its control ψ*,
  then the local updates ``∇_ω H_β = −(∂_ω f)ᵀ ψ* = −λ ⊙ ψ*`` and
  ``∇_λ H_β = −(∂_λ f)ᵀ ψ* = (φ* − ω) ⊙ ψ*`` (scaled by ``1/β``), by dynamic
  inversion (``route="di"``) or by energy minimisation (``route="energy"``);
* ``fomaml`` — first order: ``∇L_val(φ°)`` (no gradient for λ);
* ``contrastive`` — equilibrium propagation on ``F = L_train + ½ Σ λ (φ − ω)²``:
  ``∇_ω = λ (φ° − φ_β) / β`` and ``∇_λ = ½[(φ_β − ω)² − (φ° − ω)²] / β``, φ_β the
  equilibrium of the nudged objective ``F + β L_val``.

Reference: Meulemans et al., NeurIPS 2022, §5; Rajeswaran et al. 2019 (iMAML);
Zucchet et al. 2021 (contrastive meta-learning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..errors import ConfigError, SolverDivergedError
from ..registry import Registry
from ..methods.lcp import check_controlled_residual, direct_control_field, energy_descent_field
from ..solvers import Adam, Field, SolveStats
from .problem import INNER_STEP_HINT, InnerProblem, InnerSettings, inner_divergence_hint


@dataclass
class TaskBatch:
    """Support ``(x, y)`` and query ``(xq, yq)`` data of T tasks, task dimension first."""

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    classes: Optional[torch.Tensor] = None  # (T, ways): the class behind each label, for classification tasks


@dataclass
class MetaOutput:
    """Meta-gradients ``(P,)`` for ω (and for λ when learned), the mean post-adaptation validation loss, stats."""

    grad: torch.Tensor
    val_loss: float
    stats: Dict[str, Any] = field(default_factory=dict)
    grad_lam: Optional[torch.Tensor] = None


@dataclass
class MetaMethod:
    """Base of the meta-gradient methods; holds the inner solver settings.

    Args:
        inner: how the free inner equilibrium is reached.
        learn_lam: also return the gradient for a per-weight λ (``MetaOutput.grad_lam``).
    """

    name = "meta"
    inner: InnerSettings = field(default_factory=InnerSettings)
    learn_lam: bool = False

    def adapt(self, problem: InnerProblem, omega: torch.Tensor, batch: TaskBatch):
        """The free equilibrium φ° of every task (the adapted learner)."""
        return problem.equilibrium(omega, batch.x, batch.y, self.inner)

    def __call__(self, problem: InnerProblem, omega: torch.Tensor, batch: TaskBatch) -> MetaOutput:
        free = self.adapt(problem, omega, batch)
        with torch.no_grad():
            val = problem.losses(free.state, batch.xq, batch.yq)
        if not bool(torch.isfinite(val).all()):
            raise SolverDivergedError("phi", free.stats.steps, f"inner {self.inner.solver}", INNER_STEP_HINT)
        grad, grad_lam, stats = self.meta_gradient(problem, omega, batch, free.state)
        stats.update(inner_iterations=free.stats.steps, inner_residual=free.stats.residual,
                     inner_converged=free.stats.converged_fraction)
        return MetaOutput(grad, float(val.mean()), stats, grad_lam if self.learn_lam else None)

    def meta_gradient(self, problem, omega, batch, phi):
        """``(∇_ω, ∇_λ or None, stats)``, each gradient averaged over the tasks."""
        raise NotImplementedError


@dataclass
class FOMAML(MetaMethod):
    """First-order: the validation gradient at the adapted weights, ``∇L_val(φ°)``."""

    name = "fomaml"

    def __post_init__(self):
        if self.learn_lam:
            raise ConfigError("fomaml gives no gradient for λ; use lcp, imaml or contrastive to learn it")

    def meta_gradient(self, problem, omega, batch, phi):
        with torch.no_grad():
            return problem.grads(phi, batch.xq, batch.yq).mean(0), None, {}


@dataclass
class IMAML(MetaMethod):
    """Implicit MAML: conjugate gradient on ``(H + Λ) u = ∇L_val(φ°)``, ``cg_steps`` iterations.

    For a scalar λ this is the same iteration as CG on iMAML's ``(I + H/λ) v = ∇L_val``
    (``v = λu``); the symmetric form also holds for a per-weight λ.

    Safeguards, per task, for when ``H + Λ`` is not positive definite (a non-convex
    inner loss, or an inner solve that has not settled): CG stops at the first
    direction of non-positive curvature (truncated CG, as in Newton-CG), and the
    iterate with the smallest residual is returned. ``stats["cg_truncated"]`` counts
    the tasks that stopped on negative curvature.
    """

    name = "imaml"
    cg_steps: int = 10

    def meta_gradient(self, problem, omega, batch, phi):
        with torch.no_grad():
            g = problem.grads(phi, batch.xq, batch.yq)

            def A(v):
                return problem.hvp(phi, batch.x, batch.y, v) + problem.lam * v

            v = torch.zeros_like(g)
            r, p = g.clone(), g.clone()
            rr = (r * r).sum(1, keepdim=True)
            g_norm = rr.sqrt().clamp_min(1e-30)
            best_v, best_res = v.clone(), torch.full_like(rr, float("inf"))
            active = torch.ones_like(rr, dtype=torch.bool)
            truncated = torch.zeros_like(rr, dtype=torch.bool)
            for _ in range(self.cg_steps):
                Ap = A(p)
                pAp = (p * Ap).sum(1, keepdim=True)
                curved = pAp > 1e-30 * (p * p).sum(1, keepdim=True)
                solved = rr.sqrt() <= 1e-14 * g_norm
                truncated |= active & ~curved & ~solved
                active &= curved & ~solved
                alpha = torch.where(active, rr / torch.where(active, pAp, torch.ones_like(pAp)), 0.0)
                v = v + alpha * p
                r = r - alpha * Ap
                rr_new = (r * r).sum(1, keepdim=True)
                better = active & (rr_new.sqrt() < best_res)
                best_v = torch.where(better, v, best_v)
                best_res = torch.where(better, rr_new.sqrt(), best_res)
                p = torch.where(active, r + (rr_new / rr.clamp_min(1e-300)) * p, p)
                rr = torch.where(active, rr_new, rr)
            # A task that met negative curvature at once keeps the first-order guess u = g / λ.
            none = torch.isinf(best_res)
            best_v = torch.where(none, g / problem.lam, best_v)
            residual = float(torch.where(none, 1.0, best_res / g_norm).max())
            grad_lam = (-(phi - omega) * best_v).mean(0)
        return (problem.lam * best_v).mean(0), grad_lam, {"cg_residual": residual,
                                                          "cg_truncated": int(truncated.sum())}


def _time_scaled(field):
    """``field`` times the context's per-task time scale ``scale`` ``(T, 1)`` (the curvature step rule)."""
    return lambda z, c: field(z, c) * c["scale"]


@dataclass
class ControlledMetaEquilibrium:
    phi: torch.Tensor
    psi: torch.Tensor
    stats: SolveStats


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
            (one Hessian-vector product per step, Euler with the inner step size, or Anderson
            when the inner solver is ``anderson``);
            ``energy`` — Adam on the energy over φ for ``energy_steps`` steps.
        tol, max_iter: of the controlled solve (``di``).
        controlled_residual: when the controlled solve counts as settled (``di``):
            ``per-population`` (default) — φ and ψ each reach ``tol`` in their own relative
            residual; ``joint`` — one relative residual over ``[φ | ψ]``. ψ starts at zero beside
            the settled φ, so under ``joint`` its growth is judged against ‖φ‖ and can stop early.
    """

    name = "lcp"
    beta: float = 0.1
    route: str = "di"
    tol: float = 1e-5
    max_iter: int = 500
    energy_steps: int = 300
    energy_lr: float = 1e-3
    controlled_residual: str = "per-population"

    def __post_init__(self):
        check_controlled_residual(self.controlled_residual)
        if self.route not in ("di", "energy"):
            raise ConfigError(f"unknown lcp route '{self.route}'; valid: di, energy")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")

    def controlled_equilibrium(self, problem: InnerProblem, omega, batch: TaskBatch, phi_free) -> ControlledMetaEquilibrium:
        """``(φ*, ψ*)`` from the free equilibrium: no inner trajectory is kept. The controlled dynamics are
        LCP's (:mod:`leastcontrol.methods.lcp`): the direct controller for a loss that reads every weight
        (``di``), or the energy descent (``energy``), on the inner problem's field."""
        T, P = phi_free.shape
        context = {"omega": omega.detach().expand(T, -1), "x": batch.x, "y": batch.y, "xq": batch.xq, "yq": batch.yq}
        if self.route == "energy":
            field = energy_descent_field(problem.f, problem.vjp,
                                         lambda phi, c: self.beta * problem.grads(phi, c["xq"], c["yq"]), slice(None))
            solver = Adam(lr=self.energy_lr, tol=0.0, max_steps=self.energy_steps, check_every=50)
            res = solver.solve(Field(field, {"phi": P}), phi_free.detach().clone(), context)
            phi = res.state
            with torch.no_grad():
                # ψ* = −f(φ*), measured against the free equilibrium's own residual.
                psi = problem.f(phi_free, context) - problem.f(phi, context)
            return ControlledMetaEquilibrium(phi, psi, res.stats)
        field = direct_control_field(problem.f_and_vjp, lambda phi, c: problem.grads(phi, c["xq"], c["yq"]), P,
                                     self.beta)
        scale = problem.step_scale(phi_free, batch.x, batch.y, self.inner)
        if scale is not None:
            # Both populations relax through −(H + λ): the curvature rule's per-task time scale fits both.
            context["scale"] = scale
            field = _time_scaled(field)
        groups = (P, P) if self.controlled_residual == "per-population" else None
        solver = self.inner.fixed_point_solver(problem.scaled_tol(self.tol, scale), self.max_iter)
        z0 = torch.cat([phi_free, torch.zeros_like(phi_free)], dim=1)
        with inner_divergence_hint(self.inner):
            res = solver.solve(Field(field, {"phi": P, "psi": P}), z0, context, groups=groups)
        # At the equilibrium ψ* = −f(φ*). The controller's own state is used: it starts at zero, so an
        # inexact free equilibrium (f(φ°) ≠ 0) does not leak into the control.
        return ControlledMetaEquilibrium(res.state[:, :P], res.state[:, P:], res.stats)

    @staticmethod
    def local_update(problem: InnerProblem, omega: torch.Tensor, ctrl: ControlledMetaEquilibrium, beta: float):
        """The meta-updates from the controlled equilibrium alone, averaged over tasks.

        ``f = −∇L_train(φ) − λ ⊙ (φ − ω)``, so ``∂_ω f = diag(λ)`` and ``∂_λ f = −diag(φ − ω)``:

            ∇_ω = −λ ⊙ ψ* / β,      ∇_λ = (φ* − ω) ⊙ ψ* / β.

        Returns:
            ``(∇_ω, ∇_λ)``, each ``(P,)``.
        """
        return (-problem.lam * ctrl.psi / beta).mean(0), ((ctrl.phi - omega) * ctrl.psi / beta).mean(0)

    def meta_gradient(self, problem, omega, batch, phi):
        ctrl = self.controlled_equilibrium(problem, omega, batch, phi)
        stats = {"controlled_iterations": ctrl.stats.steps, "controlled_residual": ctrl.stats.residual,
                 "control_norm": float(ctrl.psi.norm(dim=1).mean())}
        return (*self.local_update(problem, omega, ctrl, self.beta), stats)


@dataclass
class Contrastive(MetaMethod):
    """Equilibrium propagation: ``λ (φ° − φ_β) / β`` with φ_β the nudged equilibrium (warm-started at φ°)."""

    name = "contrastive"
    beta: float = 0.1

    def meta_gradient(self, problem, omega, batch, phi):
        nudged = problem.equilibrium(omega, batch.x, batch.y, self.inner, start=phi, nudge=self.beta,
                                     xq=batch.xq, yq=batch.yq)
        phi_b = nudged.state
        grad = (problem.lam * (phi - phi_b) / self.beta).mean(0)
        grad_lam = (0.5 * ((phi_b - omega).pow(2) - (phi - omega).pow(2)) / self.beta).mean(0)
        return grad, grad_lam, {"nudged_iterations": nudged.stats.steps}


META_METHODS: Registry[MetaMethod] = Registry("meta method")
META_METHODS.register("lcp", LCPMeta)
META_METHODS.register("imaml", IMAML)
META_METHODS.register("fomaml", FOMAML)
META_METHODS.register("contrastive", Contrastive)


def get_meta_method(name: str, **settings) -> MetaMethod:
    """Build a meta-gradient method by name (``lcp``, ``imaml``, ``fomaml``, ``contrastive``)."""
    return META_METHODS.create(name, **settings)
