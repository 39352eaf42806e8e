"""Equilibrium propagation (EP): the update from two equilibria of an energy-based system.

On a system whose dynamics descend an energy, ``f(s) = −∂E/∂s`` (the layered Hopfield network,
:class:`~leastcontrol.systems.HopfieldEquilibrium`), with a per-sample cost ``C(o, y)`` on the
output population and the total energy ``F_β = E + β C``:

1. free phase: settle ``f`` from the zero state (or from a stored ``start``: persistent states) to
   ``s⁰`` (the prediction);
2. nudged phase: from ``s⁰``, settle ``−∂F_β/∂s = f(s) − β ∂C/∂s`` (only the output population
   feels the nudge) to ``s^β``;
3. update, the batch mean of each sample's

       ep:           (1/β)  (∂F_β/∂θ (s^β)  − ∂F_0/∂θ (s⁰))
       ep-centered:  (1/2β) (∂F_β/∂θ (s^{+β}) − ∂F_{−β}/∂θ (s^{−β}))      (nudged with ±β from s⁰)

   where ``∂F_β/∂θ = ∂E/∂θ`` for a cost that reads the state only; with a readout outside the
   energy (``o = W_L ρ(s_{L−1}) + b_L``) the readout's weights get ``β ∂C/∂θ`` too. For the
   layered network the update is local: ``ΔW_l ∝ ρ(s_l) ρ(s_{l−1})ᵀ`` in one phase minus the same
   in the other, and the readout's ``∂C/∂o ρ(s_{L−1})ᵀ``.

As β → 0 the update tends to ``∇_θ C(s⁰(θ))``, the gradient of the batch-mean loss at the free
equilibrium that recurrent backprop (``rbp``) computes; the one-sided estimate errs by O(β), the
centered one by O(β²) (Scellier & Bengio 2017; Laborieux et al. 2021). It is written to ``.grad``
with the sign of a loss gradient, on the scale of ``rbp``'s (the loss is a batch mean, each
sample nudged with β), so the same learning rates apply.

The costs: ``mse`` (``½‖o − y‖²`` with ``y`` the one-hot class, or a float target), Scellier &
Bengio's, nudging their output layer (``--model hopfield``, where it is the default); and
``cross_entropy`` on ``o`` as logits, with the linear readout Laborieux et al.'s cross-entropy
set-up (``--model hopfield-readout``; on ``hopfield`` the logits are the output layer's states).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Tuple

import torch

from ..errors import ConfigError
from ..solvers import Euler, Field, SolveResult, Solver
from ..systems.base import EquilibriumSystem
from .base import EquilibriumMethod, MethodOutput, _check_number, phase_stats


def is_energy_based(system: EquilibriumSystem) -> bool:
    """Whether ``system`` has an energy (``energy(state, x)``), so that EP can train it."""
    return callable(getattr(system, "energy", None))


def nudged_dynamics(system: EquilibriumSystem, state: Mapping[str, torch.Tensor], drive,
                    force: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``−∂(E + βC)/∂s`` for the force ``−β ∂C/∂s`` (population -> tensor): the system's own
    ``nudged_dynamics`` where it has one (the hard sigmoid takes the force inside its clamp), else
    ``f(s) + force``, which is ``−∂F_β/∂s`` for a system with ``f = −∂E/∂s``."""
    own = getattr(system, "nudged_dynamics", None)
    if own is not None:
        return own(state, drive, force)
    f = system.dynamics(state, drive)
    return {k: (v + force[k]) if k in force else v for k, v in f.items()}


def energy_param_grad(system: EquilibriumSystem, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                      force: Mapping[str, torch.Tensor] | None = None) -> Dict[str, torch.Tensor]:
    """``∂(E + βC)/∂θ`` at ``state`` summed over the batch, one tensor per named parameter, for the force
    ``−β ∂C/∂o`` (``None``: the free phase): the system's ``energy_param_grad(state, x, force)`` where
    it has one, else autograd of ``energy(state, x).sum()`` (a cost that reads the state only adds
    nothing in θ)."""
    own = getattr(system, "energy_param_grad", None)
    if own is not None:
        return own(state, x, force)
    named = [(n, p) for n, p in system.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        e = system.energy({k: v.detach() for k, v in state.items()}, x).sum()
        grads = torch.autograd.grad(e, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


@dataclass
class EP(EquilibriumMethod):
    """Equilibrium propagation, one-sided: a free phase, then one nudged phase with ``+β``.

    Args:
        beta: the nudging strength β > 0 of each sample's cost (``F_β = E + β C``). The update
            divides by it: a smaller β is a less biased estimate of the gradient (error O(β)) but
            needs tighter solves (the solvers' errors are divided by β too).
        solver, free: as for every method (:class:`EquilibriumMethod`; default Euler with dt 0.5,
            tol 1e-6, at most 2000 steps). nudged: the solver of the nudged phase(s), which start at
            ``s⁰``.
        loss: ``mse`` (default on ``hopfield``) or ``cross_entropy``; integer class targets are
            one-hot for ``mse``.
        random_sign: nudge each batch with ``+β`` or ``−β``, the sign drawn from PyTorch's generator
            (Scellier & Bengio 2017; it cancels the O(β) bias on average). The update divides by the
            signed β. Not for ``ep-centered``, which nudges both ways already.

    Raises:
        ConfigError: ``beta`` not > 0; at training, a system without an energy (:meth:`check_system`).

    >>> from leastcontrol.systems import HopfieldEquilibrium
    >>> net = HopfieldEquilibrium([4, 6, 5, 3])
    >>> out = EP(loss="mse", beta=0.5)(net, torch.rand(2, 4), torch.tensor([0, 2]))
    >>> net.W[0].grad.shape
    torch.Size([6, 4])
    """

    name = "ep"
    beta: float = 0.5
    nudged: Solver | None = None
    random_sign: bool = False

    phases: ClassVar[Tuple[str, ...]] = ("free", "nudged")
    # Scellier & Bengio's cost on their network's output layer; cross-entropy stays the default elsewhere.
    model_defaults: ClassVar[Dict[Any, Dict[str, Any]]] = {"hopfield": {"loss": "mse"}}
    centered: ClassVar[bool] = False
    takes_start: ClassVar[bool] = True   # persistent particles: the free phase may start at a stored state

    def default_solver(self) -> Solver:
        """Euler with the step ε = 0.5 of Scellier & Bengio (a full step, dt = 1, makes the layers of the
        hard-sigmoid network chatter in a 2-cycle), tol 1e-6, at most 2000 steps (samples near a
        saturation settle slowly; the rest freeze long before)."""
        return Euler(dt=0.5, max_steps=2000)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta <= 0:
            raise ConfigError(f"{self.name}: beta must be > 0, got {self.beta!r}: the update divides by the nudging "
                              "strength; set method.beta to a small positive number (e.g. 0.5; smaller is less "
                              "biased and needs tighter solves)")
        _check_number("beta", self.beta)
        if self.centered and self.random_sign:
            raise ConfigError("ep-centered nudges with +β and −β already; random_sign is a setting of ep: leave it out")

    def check_system(self, system: EquilibriumSystem) -> None:
        """EP needs an energy: raise for a system without ``energy(state, x)``.

        Raises:
            ConfigError: naming the fix (an energy-based system, ``--model hopfield``).
        """
        super().check_system(system)
        if not is_energy_based(system):
            raise ConfigError(f"{self.name} needs an energy-based system (dynamics f = −∂E/∂s and an "
                              f"energy(state, x) method); {type(system).__name__} has none: use --model hopfield "
                              "(or hopfield-readout), or a method without an energy such as rbp or lcp-di")

    # --- the phases --------------------------------------------------------------------------------------
    @torch.no_grad()
    def nudged_equilibrium(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor, beta: float,
                           free: SolveResult) -> SolveResult:
        """Settle ``f(s) − β ∂C/∂s`` (the output population nudged) from the free equilibrium ``free``.

        Args:
            x: validated inputs ``(B, n_in)``. y: validated targets. beta: the signed strength.
        """
        op = self._flat_operator(system)
        name = system.output_population
        o0 = free.state[name]
        context = {"drive": op.drive(x), "target": self._loss.dense_target(y, o0)}

        def field(z, c):
            s = op.unpack(z)
            force = {name: self._loss.dense_grad(s[name], c["target"]).mul_(-beta)}
            return op.pack(nudged_dynamics(system, s, c["drive"], force))

        res = self.nudged.solve(Field(field, op.sizes), op.pack(free.state), context)
        return SolveResult(op.unpack(res.state), res.stats)

    def _nudged_phase(self, system, x, y, beta: float, free: SolveResult):
        """The nudged equilibrium with strength ``beta`` and ``∂F_β/∂θ`` there (summed over the batch)."""
        res = self.nudged_equilibrium(system, x, y, beta, free)
        o = res.state[system.output_population]
        force = {system.output_population: self._loss.grad(o, y).mul_(-beta)}   # −β ∂C/∂o
        return res, energy_param_grad(system, res.state, x, force)

    def gradients(self, system, x, y, start: torch.Tensor | None = None):
        self.check_system(system)
        free = self.free_equilibrium(system, x, start=start)
        beta = -self.beta if self.random_sign and bool(torch.rand(()) < 0.5) else self.beta
        nudged, high = self._nudged_phase(system, x, y, beta, free)
        phases = {"free": free, "nudged": nudged}
        if self.centered:
            phases["nudged_neg"], low = self._nudged_phase(system, x, y, -self.beta, free)
            span = 2.0 * self.beta
        else:
            low, span = energy_param_grad(system, free.state, x), beta
        # The batch mean of each sample's estimate: the scale of the gradient of the batch-mean loss.
        scale = 1.0 / (span * x.shape[0])
        grads = {n: (high[n] - low[n]).mul_(scale) for n in high}
        loss, acc = self._summary(system.readout(free.state), y)
        free_state = self._flat_operator(system).pack(free.state) if start is not None else None
        return MethodOutput(loss, acc, grads, phase_stats(phases), free_state)


@dataclass
class EPCentered(EP):
    """Centered (symmetric) equilibrium propagation: nudged phases with ``+β`` and ``−β`` from ``s⁰``,
    update ``(1/2β)(∂E/∂θ(s^{+β}) − ∂E/∂θ(s^{−β}))`` (error O(β²), Laborieux et al. 2021).

    Both nudged phases use the ``nudged`` solver; their statistics are ``nudged`` and ``nudged_neg``.
    """

    name = "ep-centered"
    centered: ClassVar[bool] = True

    def settling_phases(self):
        """Both nudged phases (``nudged``, ``nudged_neg``) must settle, with the free one."""
        phases = super().settling_phases()
        return {**phases, "nudged_neg": self.nudged} if "nudged" in phases else phases

