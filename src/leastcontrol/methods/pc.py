"""Predictive coding (PC) and incremental predictive coding (iPC) on layered systems.

A layered system reads as a hierarchy of predictions (docs/guide.md, "Predictive coding"): each
population is predicted from the rates of the one below it, ``μ_l = W_l φ(v_{l−1}) + b_l`` (the first
hidden layer from the input ``x``, the output ``o`` from the last hidden layer), and

    ε_l = v_l − μ_l                                   (prediction errors)
    F(s) = Σ_l ½‖ε_l‖² + β L(o, y)                   (½‖ε‖² summed over the batch, L its mean loss)

The dynamics of such a system are ``f_l(s) = μ_l − v_l = −ε_l``, so ``F = ½‖f‖² + β L``: the relaxed
energy of LCP-EBD with ``β = 1/α`` (:func:`~leastcontrol.methods.ebd.relaxed_energy` builds its
descent for both). Each sample's loss weighs ``β/B`` against its errors, as the control of LCP does.

**Inference** starts from the feedforward pass (every ``ε = 0``) and descends ``F`` in the state,

    v̇_l = −ε_l + φ'(v_l) ⊙ W_{l+1}ᵀ ε_{l+1},        ȯ = −ε_o − (β/B) ∇_o ℓ(o, y)

with a step rule of the solver core (Euler: gradient descent with step ``dt``; or Adam) for a fixed
number of steps or to a tolerance. **Learning** descends ``F`` in θ at the state reached, scaled by
``1/β`` so that it has the units of a loss gradient:

    ∇_{W_l} = −(1/β) Σ_batch ε_l φ(v_{l−1})ᵀ,        ∇_{b_l} = −(1/β) Σ_batch ε_l

local: post-synaptic error times pre-synaptic rate. At the minimum of ``F`` this is ``(1/β)`` times
LCP's update ``−(∂_θ f)ᵀ ψ*`` (``ψ* = −f(s*) = ε*``). As ``β → 0`` it tends to the gradient of the
batch-mean loss of the feedforward network, which ``bp`` computes (Whittington & Bogacz 2017;
Millidge et al. 2022); at a strong nudge it differs.

The equations above are those of a layered network whose state holds potentials. A
:class:`~leastcontrol.systems.FeedforwardEquilibrium` with ``state="rate"`` holds rates instead, and
predicts ``μ_l = φ(W_l v_{l−1} + b_l)`` (the output, linear, ``μ_o = D v_{L−1} + c``): PC reads the
errors off its dynamics the same way, so ``F`` is pcx's energy (Pinchetti et al. 2025) and the local
update becomes ``∇_{W_l} = −(1/β) Σ_batch (φ'(W_l v_{l−1} + b_l) ⊙ ε_l) v_{l−1}ᵀ``. With
``output="clamped"``, ``loss="mse"`` and ``β = B``, ``F`` is pcx's energy with the output clamped to the
(one-hot) target, and the update is its gradient divided by ``B`` (pcx's batch mean).

References: Whittington & Bogacz (2017), Neural Computation 29(5); Millidge, Tschantz & Buckley (2022),
Neural Computation; Salvatori et al. (2024), ICLR (incremental PC); Pinchetti et al. (2025), ICLR (pcx).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import torch

from ..errors import ConfigError, SolverDivergedError
from ..solvers import Euler, Field, SolveResult, Solver, SolveStats
from ..systems.base import EquilibriumSystem, FlatOperator
from .base import EquilibriumMethod, MethodOutput, _check_number, phase_stats
from .ebd import relaxed_energy

# Where the target enters the energy: a loss on a free output population, or the output taken out of
# the state and its prediction scored by the loss.
OUTPUTS = ("nudged", "clamped")


def clamped_energy(op: FlatOperator, loss, x: torch.Tensor, y: torch.Tensor, beta: float, z0: torch.Tensor):
    """The descent field of PC's energy with the output clamped, on the hidden state ``v`` only::

        F(v) = ½‖f_v(v)‖² + β L(μ_o(v), y),     −∇_v F = −[(∂_s f)ᵀ (f_v, (β/B) ∇ℓ(μ_o))]_v

    ``μ_o(v)`` is the prediction of the output: ``f_o`` at ``o = 0`` (the dynamics of a layered system
    are ``f_o = μ_o − o``, so ``∂_v f_o = ∂_v μ_o``).

    Args:
        op: the system's flat operator. loss: the loss. x: validated inputs ``(B, n_in)``. y: targets.
        beta: the loss weight. z0: the full start ``(B, N)`` (for the target's dtype).
    Returns:
        ``(field, context)``: a :class:`~leastcontrol.solvers.Field` on ``(B, N − K)`` (the hidden
        populations), ``K`` the output width, and the batch-aligned tensors it reads.
    """
    sizes = dict(op.sizes)
    K = sizes.popitem()[1]   # the output population is last in the flat state
    n_e = op.n_state - K

    def field(v, c):
        s, a = clamped_cotangent(op, loss, v, c, beta / x.shape[0], K)
        return op.vjp(s, c["drive"], a)[:, :n_e].neg_()
    return Field(field, sizes), {"drive": op.drive(x), "target": loss.dense_target(y, z0[:, n_e:])}


def clamped_cotangent(op: FlatOperator, loss, v: torch.Tensor, context, scale: float, K: int):
    """``(s, a)`` at the hidden state ``v``: ``s = [v | 0]`` and ``a = [f_v(v) | scale·∇ℓ(μ_o(v))]``,
    whose ``(∂_s f)ᵀ a`` and ``(∂_θ f)ᵀ a`` are the gradients of the clamped energy (``scale = β/B``)."""
    s = torch.cat([v, v.new_zeros(v.shape[0], K)], dim=1)
    a = op.f(s, context["drive"])                    # its output block is μ_o, as o = 0
    a[:, -K:] = loss.dense_grad(a[:, -K:], context["target"]).mul_(scale)
    return s, a


@contextmanager
def scratch_parameters(system: EquilibriumSystem):
    """The system's parameters may be moved inside the block; on leaving it (also by an exception) each
    gets its entry value back, bit for bit. ``.grad`` and the optimizer are not touched."""
    saved = [(p, p.detach().clone()) for p in system.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@dataclass
class PC(EquilibriumMethod):
    """Predictive coding: inference descends ``F = Σ_l ½‖ε_l‖² + β L``, learning descends ``F`` in θ.

    Args:
        beta: the weight ``β > 0`` of the batch-mean loss against the prediction errors (summed over
            the batch). Small β: the update tends to backprop's gradient (error ``O(β)``); it is
            divided by β, so its scale does not depend on β.
        output: where the target enters. ``nudged`` (default): the output ``o`` is a state like the
            hidden ones, with its own error ``ε_o = o − μ_o``, pulled by ``β L(o, y)``: LCP-EBD's
            energy. ``clamped`` ("supervised PC"): ``o`` is not a state; its error term is replaced by
            the loss of its prediction, ``F = Σ_hidden ½‖ε_l‖² + β L(μ_o, y)``. With the squared error
            ``½‖o − y‖²`` and ``β = B`` (the batch size) this is ``o`` clamped to ``y``; with
            cross-entropy it scores the predicted logits against the class, as pcx's
            cross-entropy output energy does (a one-hot target is no value logits can be clamped to).
        inference: the descent of ``F`` in the state (a step rule on ``−∇F``): default Euler, i.e.
            gradient descent, with ``dt = 0.2`` for 20 steps and ``tol = 0`` (a fixed budget ``T``, as
            PC set-ups run; pcx's MLPs take T = 5–8 steps of SGD with momentum at rates 0.02–0.85).
            The step must stay below ``2/λ_max`` of the energy's curvature, which is above 2 already
            at initialisation (``dt = 1`` diverges). A ``tol`` stops at a relative residual
            ``‖Δs‖/‖s‖``; the steps start at the nudge's size (``β/B``), so keep ``tol`` well below it.
            ``Adam`` steps a fixed ``lr`` whatever the gradient, so under a weak nudge it hovers at
            about ``lr`` around the minimum.
        solver, free: the free solve (prediction, and where inference starts), see
            :class:`EquilibriumMethod`.

    Raises:
        ConfigError: at construction, ``beta`` not > 0 or an unknown ``output``; at use, a system
            that is not layered (:meth:`check_system`).

    ``gradients`` returns, besides the phases' stats, ``energy``: ``F`` where inference stopped.
    """

    name = "pc"
    beta: float = 1.0
    output: str = "nudged"
    inference: Solver | None = None

    phases: ClassVar[Tuple[str, ...]] = ("free", "inference")
    descent_phases: ClassVar[Tuple[str, ...]] = ("inference",)

    def phase_default(self, phase):
        if phase == "inference":
            return Euler(dt=0.2, tol=0.0, max_steps=20)
        return super().phase_default(phase)

    def __post_init__(self):
        super().__post_init__()
        _check_number("beta", self.beta)
        if self.output not in OUTPUTS:
            raise ConfigError(f"unknown output {self.output!r}; valid: {', '.join(OUTPUTS)}")

    def check_system(self, system: EquilibriumSystem) -> None:
        """PC reads prediction errors ``ε = −f`` off a layered system (``settle_steps`` set).

        Raises:
            ConfigError: a system that is not layered, naming the fix.
        """
        if not system.is_feedforward:
            raise ConfigError(f"{self.name} needs a layered system: --model ff (or conv-ff); "
                              f"{type(system).__name__} is recurrent, so its dynamics are no prediction errors")
        super().check_system(system)

    # -- the energy, its descent and its gradient in θ ----------------------------------------------
    def _energy(self, op: FlatOperator, x, y, start: torch.Tensor):
        """``(field, context, z0)``: the descent of ``F`` from the full flat state ``start``."""
        if self.output == "nudged":
            field, context = relaxed_energy(op, self._loss, x, y, self.beta, start)
            return field, context, start
        field, context = clamped_energy(op, self._loss, x, y, self.beta, start)
        return field, context, start[:, :sum(field.populations.values())]   # the hidden populations

    def _at(self, op: FlatOperator, x, z: torch.Tensor, context):
        """``(s, a)`` where inference reached ``z``: the full flat state and the cotangent whose
        ``(∂_θ f)ᵀ a`` is ``∇_θ F`` (``a = f(s) = −ε``, with ``β ∇L(μ_o)/B`` at a clamped output)."""
        if self.output == "nudged":
            return z, op.f(z, context["drive"])
        K = op.n_state - z.shape[1]
        s, a = clamped_cotangent(op, self._loss, z, context, self.beta / x.shape[0], K)
        s[:, -K:] = op.f(s, context["drive"])[:, -K:]    # o = μ_o, for the readout
        return s, a

    def _update(self, system, op, x, s, a) -> Dict[str, torch.Tensor]:
        """``(1/β) ∇_θ F = (1/β) (∂_θ f(s))ᵀ a``, summed over the batch (the local outer products)."""
        return {n: g.div_(self.beta) for n, g in system.param_vjp(op.unpack(s), x, op.unpack(a)).items()}

    def _energy_value(self, s, a, y, K: int) -> float:
        """``F`` at ``(s, a)`` of :meth:`_at` (``K``: the output width)."""
        errors = a[:, :-K] if self.output == "clamped" else a
        return float(0.5 * errors.pow(2).sum() + self.beta * self._loss.value(s[:, -K:], y).mean())

    # -- the rule ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
              free: SolveResult | None = None) -> SolveResult:
        """Inference from the feedforward pass (``free``, else solved here): the state it reached (for
        ``clamped``, the output read as its prediction ``μ_o``) and the stats of its solve."""
        x, y = self._inputs(system, x, y)   # class indices become one-hot rows for the squared error, as in training
        op, s, _, stats, _ = self._run(system, x, y, free if free is not None else self.free_equilibrium(system, x))
        return SolveResult(op.unpack(s), stats)

    def _run(self, system, x, y, free: SolveResult):
        """``(op, s, a, stats, update)``: inference from ``free`` with ``inference``, and the update there."""
        op = self._flat_operator(system)
        field, context, z0 = self._energy(op, x, y, op.pack(free.state))
        res = self.inference.solve(field, z0, context)
        s, a = self._at(op, x, res.state, context)
        return op, s, a, res.stats, self._update(system, op, x, s, a)

    @torch.no_grad()
    def gradients(self, system, x, y):
        self.check_system(system)
        free = self.free_equilibrium(system, x)
        op, s, a, stats, grads = self._run(system, x, y, free)
        loss, acc = self._summary(system.readout(free.state), y)
        out = phase_stats({"free": free, "inference": SolveResult(op.unpack(s), stats)})
        out["energy"] = self._energy_value(s, a, y, op.sizes[system.output_population])
        return MethodOutput(loss, acc, grads, out)

@dataclass
class IPC(PC):
    """Incremental predictive coding (Salvatori et al. 2024): a weight step after every inference step.

    Inference takes ``T = inference.max_steps`` gradient steps on the state; after step ``t`` the
    weights take one step of gradient descent with rate ``η = inner_lr`` on the batch-mean energy
    ``F/B`` at the new state (pcx averages the energy over the batch the same way)::

        s_t = s_{t−1} − dt ∇_s F(s_{t−1}; θ_{t−1}),      θ_t = θ_{t−1} − η ∇_θ F(s_t; θ_{t−1}) / B

    Stepping the state first makes ``T = 1`` exactly ``pc`` with one inference step; under the nudged
    output ``∇_θ F`` vanishes at the feedforward start, so this is the paper's simultaneous form shifted
    by one step. The update returned is ``Σ_t g_t``, ``g_t = (1/β) ∇_θ F(s_t; θ_{t−1})``: the sum of
    ``pc``'s updates along the way, in the units of a loss gradient.

    Why so: a method computes one update for the optimizer and never owns the model or the optimizer.
    The ``T`` weight steps of iPC are taken on the system's parameters inside the call and undone
    before it returns (bit for bit, also on an error: :func:`scratch_parameters`); what leaves the call
    is their sum, ``Σ_t g_t = (θ_0 − θ_T) B / (η β)``. An outer plain SGD step with
    ``lr = inner_lr·β/B`` then lands the weights exactly where iPC's ``T`` steps take them; another
    optimizer (Adam) takes the summed update as its gradient. With ``inner_lr = 0`` the weights stay
    put during inference: the states follow ``pc``'s and the update is the sum of ``pc``'s updates
    after ``1 … T`` steps. :meth:`infer` runs the same loop and returns its last state.

    The weight steps are stable while ``η`` times the energy's curvature in a weight (the squared
    norm of the rates a layer reads, ``‖φ(v_{l−1})‖²``, ``‖x‖²`` for the first) stays below 2, as for
    any gradient step.

    Args:
        inner_lr: the rate ``η ≥ 0`` of the weight steps inside inference (default 0.01).
        inference: Euler (gradient descent on the state, step ``dt``; default as :class:`PC`), with
            ``tol = 0``: every step is followed by a weight step, so it runs exactly ``max_steps``.
        beta, output, solver, free: as :class:`PC`.

    Raises:
        ConfigError: as :class:`PC`; ``inner_lr < 0``; an inference rule other than Euler (a rule with a
            memory, Adam, would restart it at every weight step) or ``tol`` not 0.
    """

    name = "ipc"
    inner_lr: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        _check_number("inner_lr", self.inner_lr, allow_zero=True)
        if not type(self.inference).plain_euler_steps:
            raise ConfigError(f"ipc steps the state by gradient descent between its weight steps; got inference="
                              f"{self.inference!r}: set method.inference.name = \"euler\" (dt: the step)")
        if self.inference.tol != 0:
            raise ConfigError(f"ipc takes exactly inference.max_steps steps, each followed by a weight step; "
                              f"set method.inference.tol = 0 (got {self.inference.tol:g})")

    def _run(self, system, x, y, free: SolveResult):
        """``(op, s, a, stats, Σ_t g_t)``: iPC's inference from ``free``, its weight steps undone."""
        one = self.inference.replace(max_steps=1)
        params = {n: p for n, p in system.named_parameters() if p.requires_grad}
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        rate = self.inner_lr * self.beta / x.shape[0]   # g = (1/β) ∇_θ F: a step of η on F/B is η β/B on g
        z, steps = None, []
        with scratch_parameters(system):
            for _ in range(self.inference.max_steps):
                # The weights moved: the operator and the input drive are read afresh.
                op = self._flat_operator(system)
                field, context, z0 = self._energy(op, x, y, op.pack(free.state))
                try:
                    res = one.solve(field, z0 if z is None else z, context)
                except SolverDivergedError as err:
                    raise SolverDivergedError(err.population, len(steps) + 1, "ipc inference",
                                              f"{err.hint} Or a smaller method.inner_lr: the weight steps are "
                                              "stable while inner_lr·‖φ‖² < 2 (docs/guide.md).") from err
                z = res.state
                steps.append(res.stats)
                s, a = self._at(op, x, z, context)
                update = self._update(system, op, x, s, a)
                for n, p in params.items():
                    total[n] += update[n]
                    p.sub_(update[n], alpha=rate)
        last = steps[-1]
        stats = SolveStats(len(steps), last.status, sum(st.sample_steps for st in steps), last.sample_residual,
                           [r for st in steps for r in st.trace])
        return op, s, a, stats, total   # s, a (and the stats' energy): the last step, with its weights
