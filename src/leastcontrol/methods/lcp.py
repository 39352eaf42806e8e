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
from typing import ClassVar, Dict, Tuple

import torch

from ..errors import ConfigError
from ..solvers import Field, SolveResult, Solver, SolveStats
from ..systems.base import EquilibriumSystem, State
from .base import EquilibriumMethod, MethodOutput, _check_number, phase_stats

# How the controlled dynamics count as settled: each population by its own relative residual, or
# one relative residual over the whole controlled state.
CONTROLLED_RESIDUALS = ("per-population", "joint")


def check_controlled_residual(rule: str) -> str:
    """``rule`` if it is one of :data:`CONTROLLED_RESIDUALS`, else a :class:`ConfigError` naming them."""
    if rule not in CONTROLLED_RESIDUALS:
        raise ConfigError(f"unknown controlled_residual '{rule}'; valid: {', '.join(CONTROLLED_RESIDUALS)}")
    return rule


def integral_control_field(f_and_vjp, grad_o, n_state: int, n_out: int, alpha: float, k_i: float, k_p: float):
    """The controlled dynamics with an integral controller on the output population (the published
    LCP-DI), on one flat buffer ``z = [s | e | u_int]`` (widths ``N``, ``N − K``, ``K``, the output
    population last in ``s``)::

        u = k_i u_int − k_p ∇_o L,   ψ = [e | u]
        ż = [f(s) + ψ,  ((∂_s f)ᵀ ψ)_hidden,  −∇_o L − α u_int]

    Args:
        f_and_vjp: ``(s, context, a) -> (f(s), (∂_s f)ᵀ a)``, flat ``(B, N)``.
        grad_o: ``(o, context) -> ∇_o L`` on the output block (a fresh tensor).
    Returns:
        The field ``(z, context) -> ż``.
    """
    N, n_e = n_state, n_state - n_out
    plain = k_i == 1.0 and not k_p   # ψ is then the tail of z itself, a view

    def field(z, c):
        s, u_int = z[:, :N], z[:, N + n_e:]
        g = grad_o(s[:, n_e:], c)
        psi = z[:, N:] if plain else torch.cat([z[:, N:N + n_e], output_control(u_int, g, k_i, k_p)], dim=1)
        f, back = f_and_vjp(s, c, psi)
        return torch.cat([f.add_(psi), back[:, :n_e], g.add_(u_int, alpha=alpha).neg_()], dim=1)
    return field


def output_control(u_int: torch.Tensor, grad_o: torch.Tensor, k_i: float, k_p: float) -> torch.Tensor:
    """The integral controller's output control ``u = k_i u_int − k_p ∇_o L``."""
    u = k_i * u_int
    return u - k_p * grad_o if k_p else u


def direct_control_field(f_and_vjp, loss_grad, n_state: int, beta: float):
    """The controlled dynamics with the loss gradient driving the inversion population directly, for a
    loss that reads the whole state (the meta-learning form), on ``z = [s | e]``::

        ṡ = f(s) + e,    ė = (∂_s f)ᵀ e − β ∇_s L(s),      ψ = e

    At rest ``ψ* = −f(s*)`` and ``(∂_s f)ᵀ ψ* = β ∇_s L``: the stationarity of ``½‖f‖² + β L``, as
    for the integral controller.
    """
    N = n_state

    def field(z, c):
        s, e = z[:, :N], z[:, N:]
        f, back = f_and_vjp(s, c, e)
        return torch.cat([f + e, back - beta * loss_grad(s, c)], dim=1)
    return field


def energy_descent_field(f, vjp, loss_term, read: slice):
    """``−∇_s E`` of the relaxed least-control energy ``E(s) = ½‖f(s)‖² + β L(s)`` (the energy route)::

        −∇_s E = −(∂_s f)ᵀ f − β ∇_s L

    Args:
        f: ``(s, context) -> f(s)``. vjp: ``(s, context, a) -> (∂_s f)ᵀ a`` (a fresh tensor).
        loss_term: ``(s_read, context) -> β ∇L`` on the columns ``read`` of the state the loss reads.
    """
    def field(z, c):
        grad = vjp(z, c, f(z, c))
        grad[:, read] += loss_term(z[:, read], c)
        return grad.neg_()
    return field


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
    stats: SolveStats
    free: SolveResult


@dataclass
class LCPDI(EquilibriumMethod):
    """LCP with dynamic inversion.

    Args:
        alpha: leak α of the integral controller (an Euler controlled phase needs ``|1 − dt·α| < 1``).
        k_i: integral gain. k_p: proportional gain. Control strength ``β = k_i/α + k_p``.
            The controlled equilibrium and the update depend on the gains only through β; the
            gains shape the path there. Where the control of each sample is weak (``β/B`` small:
            the published batch of 64), the Euler-stepped controller settles at about ``1 − dt·α``
            per step, so α 0.1, k_i 1 needs ≈130 steps to 1e-6 however fast the network settles;
            α 1, k_i 10 (the same β) needs far fewer.
        controlled_residual: when the controlled dynamics count as settled. ``per-population``
            (default): the state ``s``, the hidden control ``e`` and the controller ``u_int`` each
            reach the controlled solver's ``tol`` in their own relative residual. ``joint``: one
            relative residual over all three, the research code's criterion; from the free
            equilibrium, where ``e`` and ``u_int`` start at zero beside a large settled ``s``, that
            one can pass ``tol`` before the control has grown.
        solver, free, controlled: the solvers of the phases (:class:`EquilibriumMethod`); the
            controlled dynamics start from the free equilibrium, solved by ``free`` (a looser ``free``
            tolerance saves steps, but where the trained dynamics have several attractors it can
            settle a sample elsewhere).

    >>> from leastcontrol.systems import RecurrentEquilibrium
    >>> from leastcontrol.solvers import Euler
    >>> net = RecurrentEquilibrium(4, 6, 3)
    >>> out = LCPDI(solver=Euler(max_steps=50))(net, torch.rand(2, 4), torch.tensor([0, 2]))
    >>> net.W.grad.shape
    torch.Size([6, 6])
    """

    name = "lcp-di"
    alpha: float = 0.1
    k_i: float = 1.0
    k_p: float = 0.0
    controlled_residual: str = "per-population"
    controlled: Solver | None = None

    phases: ClassVar[Tuple[str, ...]] = ("free", "controlled")

    def __post_init__(self):
        super().__post_init__()
        _check_number("alpha", self.alpha)
        check_controlled_residual(self.controlled_residual)
        _check_number("k_i", self.k_i)
        _check_number("k_p", self.k_p, allow_zero=True)
        if type(self.controlled).plain_euler_steps and not abs(1.0 - self.controlled.dt * self.alpha) < 1.0:
            raise ConfigError(
                f"alpha={self.alpha} with dt={self.controlled.dt} makes the Euler-stepped controller diverge "
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

    @torch.no_grad()
    def controlled_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
                               free: SolveResult | None = None) -> ControlledEquilibrium:
        """Run the controlled dynamics from the free equilibrium to ``(s*, ψ*)``."""
        x = system.prepare_input(x)
        free = free if free is not None else self.free_equilibrium(system, x)
        # One flat buffer z = [s | e | u_int]. With the output population last in s,
        # ψ = [e | u] is the tail of z (a view when u = u_int), and the step is
        #     ż = [f(s) + ψ,  ((∂_s f)ᵀ ψ)_hidden,  −∇_o L − α u_int].
        op = self._flat_operator(system, self._feedback(system))
        N = op.n_state
        n_out = op.sizes[system.output_population]
        n_e = N - n_out
        inv_B = 1.0 / x.shape[0]   # ∇_o of the batch-mean loss, B the full batch

        def grad_o(o, c):
            return self._loss.dense_grad(o, c["target"]).mul_(inv_B)
        field = integral_control_field(lambda s, c, a: op.f_and_vjp(s, c["drive"], a), grad_o, N, n_out,
                                       self.alpha, self.k_i, self.k_p)

        s0 = op.pack(free.state)
        z0 = torch.cat([s0, s0.new_zeros(s0.shape[0], N)], dim=1)
        context = {"drive": op.drive(x), "target": self._loss.dense_target(y, s0[:, n_e:])}
        populations = {**op.sizes, **{"e_" + k: w for k, w in op.sizes.items() if k != system.output_population},
                       "u_int": n_out}
        kernels = self._kernels(system, op, "controlled", loss=self._loss.name, alpha=self.alpha, k_i=self.k_i,
                                k_p=self.k_p, inv_B=inv_B)
        res = self.controlled.solve(Field(field, populations, kernels), z0, context, groups=self._groups(N, n_e, n_out))
        z = res.state
        state = op.unpack(z[:, :N])
        u = output_control(z[:, N + n_e:], grad_o(z[:, n_e:N], context), self.k_i, self.k_p)
        control = op.unpack(torch.cat([z[:, N:N + n_e], u], dim=1))
        return ControlledEquilibrium(state, control, res.stats, free)

    def _groups(self, *widths):
        """The residual groups of the controlled solve: each population on its own under ``per-population``.

        The control starts at zero beside a settled free state: judged by one residual over the
        whole state (``joint``), its growth hides behind ‖s‖ and a loose tol stops it early.
        """
        return widths if self.controlled_residual == "per-population" else None

    def gradients(self, system, x, y):
        free = self.free_equilibrium(system, x)
        ctrl = self.controlled_equilibrium(system, x, y, free)
        self._after_controlled(system, x, y, ctrl)
        # ∇_θ H_β = −(∂_θ f(s*))ᵀ ψ*, summed over the batch (L is already a batch mean).
        grads = local_update(system, x, ctrl)
        loss, acc = self._summary(system.readout(free.state), y)
        control_norm = 0.5 * sum(c.pow(2).sum() for c in ctrl.control.values())
        stats = phase_stats({"free": free, "controlled": SolveResult(ctrl.state, ctrl.stats)})
        stats["control_norm"] = float(control_norm)
        return MethodOutput(loss, acc, grads, stats)
