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
from ..solvers import SolverStats, check_controlled_residual
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
            raise SolverDivergedError("phi", free.stats.iterations, f"inner {self.inner.solver}", INNER_STEP_HINT)
        grad, grad_lam, stats = self.meta_gradient(problem, omega, batch, free.state)
        stats.update(inner_iterations=free.stats.iterations, inner_residual=free.stats.residual,
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
        """``(φ*, ψ*)`` from the free equilibrium: no inner trajectory is kept."""
        T = phi_free.shape[0]
        omega_t = omega.detach().expand(T, -1)
        if self.route == "energy":
            return self._energy(problem, omega_t, batch, phi_free)

        def field(s, c):
            phi, psi = s["phi"], s["psi"]
            # f = −∇L − λ(φ − ω) and (∂_φ f)ᵀ ψ = −(H + λ)ψ from one double backward.
            g, hpsi = problem.grad_and_hvp(phi, c["x"], c["y"], psi)
            f = -g - problem.lam * (phi - c["omega"])
            back = -hpsi - problem.lam * psi
            out = {"phi": f + psi, "psi": back - self.beta * problem.grads(phi, c["xq"], c["yq"])}
            # Both populations relax through −(H + λ): the curvature rule's per-task time scale fits both.
            return {k: v * c["scale"] for k, v in out.items()} if "scale" in c else out

        context = {"omega": omega_t, "x": batch.x, "y": batch.y, "xq": batch.xq, "yq": batch.yq}
        scale = problem.step_scale(phi_free, batch.x, batch.y, self.inner)
        if scale is not None:
            context["scale"] = scale
        groups = "entries" if self.controlled_residual == "per-population" else None
        solver = self.inner.fixed_point_solver(problem.scaled_tol(self.tol, scale), self.max_iter, groups)
        with torch.no_grad(), inner_divergence_hint(self.inner):
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
        stats = {"controlled_iterations": ctrl.stats.iterations, "controlled_residual": ctrl.stats.residual,
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
        return grad, grad_lam, {"nudged_iterations": nudged.stats.iterations}


META_METHODS: Registry[MetaMethod] = Registry("meta method")
META_METHODS.register("lcp", LCPMeta)
META_METHODS.register("imaml", IMAML)
META_METHODS.register("fomaml", FOMAML)
META_METHODS.register("contrastive", Contrastive)


def get_meta_method(name: str, **settings) -> MetaMethod:
    """Build a meta-gradient method by name (``lcp``, ``imaml``, ``fomaml``, ``contrastive``)."""
    return META_METHODS.create(name, **settings)
