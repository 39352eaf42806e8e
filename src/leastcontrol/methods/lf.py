"""LCP with linear feedback (LCP-LF): no inversion population, a learned feedback matrix Q.

The output controller's signal reaches the hidden units through a fixed-size
linear feedback, ``v̇ = f_v(v) + Q u``, ``ȯ = f_o(v, o) + u`` (integral controller
as in LCP-DI). At the controlled equilibrium the hidden units' local update uses
the feedback signal modulated by the rate slope, ``ψ_v = φ'(v*) ⊙ (Q u*)``, and
the output units use ``ψ_o = u*``.

Q (hidden × output, initialised N(0, 1/n_out)) is a buffer of the system and is
learned by a local, noise-driven rule: after the controlled equilibrium, a
second, noisy controlled phase injects Ornstein-Uhlenbeck noise ``σ ε`` into the
hidden units; the correlation of that perturbation with the change it causes
in the control,

    C = −(1/σ²) ⟨ σε (u − u*)ᵀ ⟩,      Q ← Q + (T·s²/τ_Q) (C − wd_Q · Q),

(T the length of the noisy phase, s the time-scale factor by which the noisy
phase runs faster than learning) moves Q towards the negative sensitivity of
the control to hidden activity, i.e. towards what dynamic inversion would send
back (``∝ φ' Dᵀ``).

Reference: Meulemans et al., NeurIPS 2022, §3 and appendix on linear feedback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch

from ..errors import ConfigError
from ..systems.base import EquilibriumSystem
from .base import _check_number
from ..solvers import Field
from .lcp import LCPDI, ControlledEquilibrium, output_control


@dataclass
class LCPLF(LCPDI):
    """LCP with a learned linear feedback matrix.

    Args:
        sigma: standard deviation of the hidden noise in the noisy phase.
        tau_noise: correlation time of the Ornstein-Uhlenbeck noise (in steps of dt).
        noise_steps: length of the noisy phase (Euler steps); 0 disables learning Q.
        tau_q: time constant of Q's learning. wd_q: its weight decay.
        timescale: factor by which the noisy phase runs faster than Q's learning (enters squared).
        alpha, k_i, k_p, solver, free, controlled: as :class:`LCPDI`.
    """

    name = "lcp-lf"
    sigma: float = 0.01
    tau_noise: float = 20.0
    noise_steps: int = 200
    tau_q: float = 1e5
    wd_q: float = 0.01
    timescale: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if any(b.name == "native" for b in self.controlled._backends):
            raise ConfigError("the native backend covers the free phase, RBP and LCP-DI/KP; LCP-LF's controlled field "
                              "(feedback through Q) has no native steps; drop 'native' from the controlled solver")
        for key in ("sigma", "tau_noise", "tau_q", "timescale"):
            _check_number(key, getattr(self, key))
        _check_number("wd_q", self.wd_q, allow_zero=True)
        if not (isinstance(self.noise_steps, int) and self.noise_steps >= 0):
            raise ConfigError(f"noise_steps must be an integer >= 0, got {self.noise_steps!r}")

    def prepare(self, system: EquilibriumSystem, generator: torch.Generator | None = None) -> None:
        """Give the system its feedback buffer ``lf_Q`` (hidden × output, N(0, 1/n_out)) if it has none."""
        if getattr(system, "lf_Q", None) is None:
            hidden = sum(n for p, n in system.population_sizes().items() if p != system.output_population)
            q = torch.randn(hidden, system.n_out, generator=generator, dtype=system.dtype) / math.sqrt(system.n_out)
            system.register_buffer("lf_Q", q.to(system.device))

    @torch.no_grad()
    def alignment(self, system: EquilibriumSystem) -> Dict[str, float]:
        """Cosine between Q's rows for the last hidden units and ``Dᵀ``, the output weights' transpose.

        Dynamic inversion sends the output control back through ``Dᵀ`` (times φ'); this measures
        how far the learned feedback has turned towards that pathway.
        """
        D = dict(system.named_parameters()).get("D")
        if D is None:
            return {}
        Q = self._Q(system)[-D.shape[1]:]
        a, b = Q.reshape(-1), D.t().reshape(-1)
        return {"Q": float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))}

    def _Q(self, system):
        self.prepare(system)
        return system.lf_Q

    def check_system(self, system) -> None:
        super().check_system(system)
        self._hidden(system)

    def _hidden(self, system):
        hidden = [p for p in system.population_sizes() if p != system.output_population]
        if len(hidden) != 1:
            raise ValueError("lcp-lf needs a system with one hidden population 'v' and an output population")
        return hidden[0]

    def _flat(self, system, x, y):
        """LF's dynamics on one flat buffer ``z = [s | u_int]``, ``s = [v | o]`` (output last).

        Returns the flat operator, the width ``n_out`` of ``o``, the drive, the dense target and
        ``P = [Qᵀ | I]`` (``n_out × N``), so that one ``addmm`` adds the feedback to the whole state:

            ṡ = f(s) + u P  (+ [η | 0] in the noisy phase),   u̇_int = −∇_o L − α u_int.
        """
        op = self._flat_operator(system)
        self._hidden(system)
        n_out = op.sizes[system.output_population]
        Q = self._Q(system)
        P = torch.cat([Q, torch.eye(n_out, dtype=Q.dtype, device=Q.device)]).t().contiguous()
        drive = op.drive(x)
        target = self._loss.dense_target(y, x.new_zeros(x.shape[0], n_out, dtype=Q.dtype))
        return op, n_out, drive, target, P

    def _output_control(self, s, u_int, target, n_out, inv_B):
        """``∇_o L`` (batch mean) at the output block of ``s``, and the control ``u``."""
        grad_o = self._loss.dense_grad(s[:, -n_out:], target).mul_(inv_B)
        return grad_o, output_control(u_int, grad_o, self.k_i, self.k_p)

    @torch.no_grad()
    def controlled_equilibrium(self, system, x, y, free=None) -> ControlledEquilibrium:
        """Controlled dynamics with linear feedback, from the free equilibrium."""
        x = system.prepare_input(x)
        free = free if free is not None else self.free_equilibrium(system, x)
        hid = self._hidden(system)
        op, n_out, drive, target, P = self._flat(system, x, y)
        N, inv_B = op.n_state, 1.0 / x.shape[0]

        def field(z, c):
            s, u_int = z[:, :N], z[:, N:]
            grad_o, u = self._output_control(s, u_int, c["target"], n_out, inv_B)
            ds = op.f(s, c["drive"]).addmm_(u, P)
            return torch.cat([ds, grad_o.add_(u_int, alpha=self.alpha).neg_()], dim=1)

        s0 = op.pack(free.state)
        z0 = torch.cat([s0, s0.new_zeros(s0.shape[0], n_out)], dim=1)
        # Each population (v, o, u_int) settles to tol in its own relative residual.
        field = Field(field, {**op.sizes, "u_int": n_out})
        res = self.controlled.solve(field, z0, {"drive": drive, "target": target},
                                    groups=self._groups(*op.sizes.values(), n_out))
        s, u_int = res.state[:, :N], res.state[:, N:]
        _, u = self._output_control(s, u_int, target, n_out, inv_B)
        state = op.unpack(s)
        # The local update reads the feedback signal modulated by φ'(v*).
        control = {hid: system.rate_slope(state)[hid] * (u @ self._Q(system).t()), system.output_population: u}
        return ControlledEquilibrium(state, control, res.stats, free)

    @torch.no_grad()
    def feedback_covariance(self, system, x, y, ctrl: ControlledEquilibrium,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """The noisy phase: ``C = −(1/σ²) ⟨σε (u − u*)ᵀ⟩`` (hidden × output) around the controlled equilibrium.

        ``noise_steps`` Euler steps of the controlled dynamics with OU noise ``η = σε`` on the hidden
        units, from ``(s*, u*)``; each step's noise is correlated with the control it leads to.
        """
        out = system.output_population
        op, n_out, drive, target, P = self._flat(system, x, y)
        B = x.shape[0]
        n_h, inv_B = op.n_state - n_out, 1.0 / B
        u_ref = ctrl.control[out]
        s = op.pack(ctrl.state)
        grad_o = self._loss.dense_grad(s[:, n_h:], target).mul_(inv_B)
        u_int = (u_ref + self.k_p * grad_o) / self.k_i
        u = output_control(u_int, grad_o, self.k_i, self.k_p)
        dt = self.controlled.dt
        a = math.exp(-dt / self.tau_noise)
        eps = torch.randn((B, n_h), generator=generator, dtype=s.dtype).to(s.device)
        acc = torch.zeros_like(self._Q(system))
        for _ in range(self.noise_steps):
            eta = self.sigma * eps
            ds = op.f(s, drive).addmm_(u, P)
            ds[:, :n_h] += eta
            u_int = u_int - dt * (grad_o + self.alpha * u_int)
            s = s.add_(ds, alpha=dt)
            # u at the new state: read by the covariance now and by the next step's field.
            grad_o, u = self._output_control(s, u_int, target, n_out, inv_B)
            acc.addmm_(eta.t(), u - u_ref)
            noise = torch.randn(eps.shape, generator=generator, dtype=eps.dtype).to(eps.device)
            eps = a * eps + math.sqrt(1 - a * a) * noise
        return -acc / (self.sigma ** 2 * max(self.noise_steps, 1) * B)

    @torch.no_grad()
    def learn_feedback(self, system, x, y, ctrl: ControlledEquilibrium) -> torch.Tensor:
        """One local update of Q from a noisy phase; returns the covariance estimate C."""
        C = self.feedback_covariance(system, x, y, ctrl)
        rate = self.noise_steps * self.controlled.dt * self.timescale ** 2 / self.tau_q
        Q = self._Q(system)
        Q += rate * (C - self.wd_q * Q)
        return C

    def _after_controlled(self, system, x, y, ctrl):
        if self.noise_steps:
            self.learn_feedback(system, x, y, ctrl)
