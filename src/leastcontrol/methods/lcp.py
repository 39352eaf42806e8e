"""The least-control principle with dynamic inversion (LCP-DI).

A controller on the output units drives the system to a state that reduces
the loss; a hidden control population ``e`` runs the transposed linearised
dynamics so that the total control ``ψ = (e, u)`` is the least one needed:

    u̇_i = −∇_o L(o) − α u_i,           u = k_i u_i − k_p ∇_o L(o)
    ė   = (∂_v f)ᵀ ψ                    (one VJP per step)
    v̇   = f_v(v) + e,     ȯ = f_o(v, o) + u

At the controlled equilibrium ``ψ* = −f(s*)`` and ``(∂_s f)ᵀ ψ* = β ∇_s L``
with ``β = k_i/α + k_p``: the stationarity of ``H_β(θ) = min_s ½‖f(s)‖² + β L(s)``.
For a batch, ``s`` stacks the samples' states, ``½‖f‖²`` sums over them and
``L`` is the batch-mean loss (PyTorch's default reduction), so each sample is
controlled with strength ``β/B``; this is the convention of the published
set-ups, whose numbers the defaults reproduce.
The envelope theorem then gives the local update

    ∇_θ H_β = −(∂_θ f(s*, θ))ᵀ ψ*          (one VJP in θ; ``−ψ*_v φ(v*)ᵀ`` for W)

which is written to ``.grad`` unscaled (no ``1/β``), as in the published set-ups.
As β → 0, ``(1/β) ∇_θ H_β`` tends to the RBP gradient ``∇_θ L(s°)``.

Reference: Meulemans et al., NeurIPS 2022, §3 and Appendix on dynamic inversion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..errors import ConfigError
from ..solvers import SolveResult, SolverStats, check_controlled_residual
from ..systems.base import EquilibriumSystem, State
from .base import EquilibriumMethod, MethodOutput, _check_number, two_phase_stats


def local_update(system: EquilibriumSystem, x: torch.Tensor, ctrl: "ControlledEquilibrium") -> Dict[str, torch.Tensor]:
    """The LCP update ``∇_θ H_β = −(∂_θ f(s*))ᵀ ψ*``, summed over the batch.

    For the built-in networks this is computed as explicit outer products of
    postsynaptic control and presynaptic rate (``ΔW = −ψ_vᵀ φ(v*)``, ``ΔU = −ψ_vᵀ x``,
    ``ΔD = −ψ_oᵀ φ(v*)``, biases ``−Σ ψ``); other systems use one autograd VJP in θ.

    Args:
        system: the equilibrium system. x: validated inputs ``(B, n_in)``.
        ctrl: the controlled equilibrium (state ``s*`` and control ``ψ*``).
    Returns:
        Parameter name -> update, with the sign of a loss gradient.
    """
    return {n: -g for n, g in system.param_vjp(ctrl.state, x, ctrl.control).items()}


@dataclass
class ControlledEquilibrium:
    """The optimal controlled state ``s*``, its control ``ψ*`` and the solver statistics."""

    state: State
    control: State
    stats: SolverStats
    free: SolveResult


@dataclass
class LCPDI(EquilibriumMethod):
    """LCP with dynamic inversion.

    Args:
        alpha: leak α of the integral controller (Euler needs ``|1 − dt·α| < 1``).
        k_i: integral gain. k_p: proportional gain. Control strength ``β = k_i/α + k_p``.
            The controlled equilibrium and the update depend on the gains only through β; the
            gains shape the path there. Where the control of each sample is weak (``β/B`` small:
            the published batch of 64), the Euler-stepped controller settles at about ``1 − dt·α``
            per step, so α 0.1, k_i 1 needs ≈130 steps to 1e-6 however fast the network settles;
            α 1, k_i 10 (the same β) needs far fewer (``docs/performance.md``).
        warm_start_tol: tolerance of the free solve that starts the controlled dynamics
            (and gives the reported training loss); ``None`` (default): ``tol``. The
            controlled solve still reaches ``tol``; a loose warm start (e.g. 1e-4) saves
            steps but, where the trained dynamics have several attractors, can settle a
            sample elsewhere (bundled-digits job: 0.900 with 1e-4 against 0.914).
        controlled_residual: when the controlled dynamics count as settled. ``per-population``
            (default): the state ``s``, the hidden control ``e`` and the controller ``u_int`` each
            reach ``tol`` in their own relative residual. ``joint``: one relative residual over
            all three, the research code's criterion; from the free equilibrium, where ``e`` and
            ``u_int`` start at zero beside a large settled ``s``, that one can pass ``tol`` before
            the control has grown (a trained DEQ at tol 1e-4: after 10 steps, with an update at
            cosine 0.74 with the settled one).
        dt, tol, max_iter, solver: settings of the free and the controlled solves.

    >>> from leastcontrol.systems import RecurrentEquilibrium
    >>> net = RecurrentEquilibrium(4, 6, 3)
    >>> out = LCPDI(max_iter=50)(net, torch.rand(2, 4), torch.tensor([0, 2]))
    >>> net.W.grad.shape
    torch.Size([6, 6])
    """

    name = "lcp-di"
    alpha: float = 0.1
    k_i: float = 1.0
    k_p: float = 0.0
    warm_start_tol: float | None = None
    controlled_residual: str = "per-population"

    def __post_init__(self):
        super().__post_init__()
        _check_number("alpha", self.alpha)
        if self.warm_start_tol is not None:
            _check_number("warm_start_tol", self.warm_start_tol, allow_zero=True)
        self._warm_solver = (self._solver if self.warm_start_tol is None
                             else self._make_solver(max(self.warm_start_tol, self.tol)))
        check_controlled_residual(self.controlled_residual)
        _check_number("k_i", self.k_i)
        _check_number("k_p", self.k_p, allow_zero=True)
        if self.solver == "euler" and not abs(1.0 - self.dt * self.alpha) < 1.0:
            raise ConfigError(
                f"alpha={self.alpha} with dt={self.dt} makes the Euler-stepped controller diverge "
                "(needs |1 − dt·alpha| < 1); reach a small beta by lowering k_i instead of raising alpha"
            )

    @property
    def beta(self) -> float:
        """Control strength β of the relaxed problem ``H_β``."""
        return self.k_i / self.alpha + self.k_p

    def _after_controlled(self, system, x, y, ctrl: ControlledEquilibrium) -> None:
        """Hook for routes that learn from the controlled equilibrium (e.g. LF's feedback matrix)."""

    def _feedback(self, system: EquilibriumSystem):
        """Matrices replacing the weight transposes on the way back (``None``: the exact transposes)."""
        return None

    def _control(self, u_int, grad_o):
        """The output control ``u = k_i u_int − k_p ∇_o L``."""
        u = self.k_i * u_int
        return u - self.k_p * grad_o if self.k_p else u

    @torch.no_grad()
    def controlled_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
                               free: SolveResult | None = None) -> ControlledEquilibrium:
        """Run the controlled dynamics from the free equilibrium to ``(s*, ψ*)``."""
        x = system.prepare_input(x)
        free = free if free is not None else self.warm_start(system, x)
        # One flat buffer z = [s | e | u_int]. With the output population last in s,
        # ψ = [e | u] is the tail of z (a view when u = u_int), and the step is
        #     ż = [f(s) + ψ,  ((∂_s f)ᵀ ψ)_hidden,  −∇_o L − α u_int].
        op = self._flat_operator(system, self._feedback(system))
        N = op.n_state
        n_out = op.sizes[system.output_population]
        n_e = N - n_out
        inv_B = 1.0 / x.shape[0]   # ∇_o of the batch-mean loss, B the full batch
        plain_control = self.k_i == 1.0 and not self.k_p

        def field(z, c):
            s, u_int = z[:, :N], z[:, N + n_e:]
            grad_o = self._loss.dense_grad(s[:, n_e:], c["target"]).mul_(inv_B)
            if plain_control:
                psi = z[:, N:]
            else:
                psi = torch.cat([z[:, N:N + n_e], self._control(u_int, grad_o)], dim=1)
            f, back = op.f_and_vjp(s, c["drive"], psi)
            return torch.cat([f.add_(psi), back[:, :n_e], grad_o.add_(u_int, alpha=self.alpha).neg_()], dim=1)

        s0 = op.pack(free.state)
        z0 = torch.cat([s0, s0.new_zeros(s0.shape[0], N)], dim=1)
        context = {"drive": op.drive(x), "target": self._loss.dense_target(y, s0[:, n_e:])}
        populations = {**op.sizes, **{"e_" + k: w for k, w in op.sizes.items() if k != system.output_population},
                       "u_int": n_out}
        native = self._native_steps(system, op, "controlled", loss=self._loss.name, alpha=self.alpha, k_i=self.k_i,
                                    k_p=self.k_p, inv_B=inv_B)
        res = self._solve_flat(field, z0, context, self._controlled_solver((N, n_e, n_out)), populations=populations,
                               native_steps=native)
        z = res.state
        state = op.unpack(z[:, :N])
        grad_o = self._loss.dense_grad(z[:, n_e:N], context["target"]).mul_(inv_B)
        control = op.unpack(torch.cat([z[:, N:N + n_e], self._control(z[:, N + n_e:], grad_o)], dim=1))
        return ControlledEquilibrium(state, control, res.stats, free)

    def _controlled_solver(self, groups):
        """The solver of the controlled phase: under ``per-population``, each of ``groups`` to tol.

        The control starts at zero beside a settled free state: judged by one residual over the
        whole state (``joint``), its growth hides behind ‖s‖ and a loose tol stops it early.
        """
        if self.controlled_residual == "per-population":
            return self._make_solver(self.tol, groups=groups)
        return self._solver

    def warm_start(self, system: EquilibriumSystem, x: torch.Tensor) -> SolveResult:
        """The free equilibrium to ``warm_start_tol``: where the controlled dynamics start."""
        return self.free_equilibrium(system, x, self._warm_solver)

    def gradients(self, system, x, y):
        free = self.warm_start(system, x)
        ctrl = self.controlled_equilibrium(system, x, y, free)
        self._after_controlled(system, x, y, ctrl)
        # ∇_θ H_β = −(∂_θ f(s*))ᵀ ψ*, summed over the batch (L is already a batch mean).
        grads = local_update(system, x, ctrl)
        loss, acc = self._summary(system.readout(free.state), y)
        control_norm = 0.5 * sum(c.pow(2).sum() for c in ctrl.control.values())
        stats = two_phase_stats(free, "controlled", SolveResult(ctrl.state, ctrl.stats))
        stats["control_norm"] = float(control_norm)
        return MethodOutput(loss, acc, grads, stats)
