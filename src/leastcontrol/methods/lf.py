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
from .lcp import ControlledEquilibrium, LCPDI


@dataclass
class LCPLF(LCPDI):
    """LCP with a learned linear feedback matrix.

    Args:
        sigma: standard deviation of the hidden noise in the noisy phase.
        tau_noise: correlation time of the Ornstein-Uhlenbeck noise (in steps of dt).
        noise_steps: length of the noisy phase (Euler steps); 0 disables learning Q.
        tau_q: time constant of Q's learning. wd_q: its weight decay.
        timescale: factor by which the noisy phase runs faster than Q's learning (enters squared).
        alpha, k_i, k_p, dt, tol, max_iter: as :class:`LCPDI`.
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

    def _hidden(self, system):
        hidden = [p for p in system.population_sizes() if p != system.output_population]
        if len(hidden) != 1:
            raise ValueError("lcp-lf needs a system with one hidden population 'v' and an output population")
        return hidden[0]

    def _field(self, system, y, B, noise=None):
        out, hid = system.output_population, self._hidden(system)
        Q = self._Q(system)

        def field(z, c) -> Dict[str, torch.Tensor]:
            grad_o = self._loss.grad(z[out], c["y"]) / B
            u = self._control(z["u_int"], grad_o)
            f = system.dynamics({hid: z[hid], out: z[out]}, c["drive"])
            d = {hid: f[hid] + u @ Q.t(), out: f[out] + u, "u_int": -grad_o - self.alpha * z["u_int"]}
            if noise is not None:
                d[hid] = d[hid] + noise
            return d

        return field

    @torch.no_grad()
    def controlled_equilibrium(self, system, x, y, free=None) -> ControlledEquilibrium:
        """Controlled dynamics with linear feedback, from the free equilibrium."""
        x = system.prepare_input(x)
        free = free if free is not None else self.warm_start(system, x)
        out, hid = system.output_population, self._hidden(system)
        B = x.shape[0]
        z0 = dict(free.state, u_int=torch.zeros_like(free.state[out]))
        res = self._solve(self._field(system, y, B), z0, {"drive": system.encode(x), "y": y},
                          self._controlled_solver("entries"))
        z = res.state
        u = self._control(z["u_int"], self._loss.grad(z[out], y) / B)
        feedback = u @ self._Q(system).t()
        slope = system.rate_slope(z)[hid]
        # The local update reads the feedback signal modulated by φ'(v*).
        control = {hid: slope * feedback, out: u}
        return ControlledEquilibrium({hid: z[hid], out: z[out]}, control, res.stats, free)

    @torch.no_grad()
    def feedback_covariance(self, system, x, y, ctrl: ControlledEquilibrium,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """The noisy phase: ``C = −(1/σ²) ⟨σε (u − u*)ᵀ⟩`` (hidden × output) around the controlled equilibrium."""
        out, hid = system.output_population, self._hidden(system)
        B = x.shape[0]
        context = {"drive": system.encode(x), "y": y}
        u_ref = ctrl.control[out]
        z = dict(ctrl.state)
        z["u_int"] = (u_ref + self.k_p * self._loss.grad(z[out], y) / B) / self.k_i
        a = math.exp(-self.dt / self.tau_noise)
        eps = torch.randn(z[hid].shape, generator=generator, dtype=z[hid].dtype).to(z[hid].device)
        acc = torch.zeros_like(self._Q(system))
        for _ in range(self.noise_steps):
            eta = self.sigma * eps
            d = self._field(system, y, B, noise=eta)(z, context)
            z = {k: z[k] + self.dt * d[k] for k in z}
            u = self._control(z["u_int"], self._loss.grad(z[out], y) / B)
            acc += eta.t() @ (u - u_ref)
            noise = torch.randn(eps.shape, generator=generator, dtype=eps.dtype).to(eps.device)
            eps = a * eps + math.sqrt(1 - a * a) * noise
        return -acc / (self.sigma ** 2 * max(self.noise_steps, 1) * B)

    @torch.no_grad()
    def learn_feedback(self, system, x, y, ctrl: ControlledEquilibrium) -> torch.Tensor:
        """One local update of Q from a noisy phase; returns the covariance estimate C."""
        C = self.feedback_covariance(system, x, y, ctrl)
        rate = self.noise_steps * self.dt * self.timescale ** 2 / self.tau_q
        Q = self._Q(system)
        Q += rate * (C - self.wd_q * Q)
        return C

    def _after_controlled(self, system, x, y, ctrl):
        if self.noise_steps:
            self.learn_feedback(system, x, y, ctrl)
