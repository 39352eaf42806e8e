"""The layered continuous Hopfield network of equilibrium propagation (Scellier & Bengio 2017).

Layers ``s_1 … s_L``, the input ``x = s_0`` clamped (``ρ(s_0) = x``), symmetric coupling between
adjacent layers and an energy

    E(s) = ½ Σ_l ‖s_l‖² − Σ_l ρ(s_l)ᵀ W_l ρ(s_{l−1}) − Σ_l b_lᵀ ρ(s_l)

whose negative gradient is the dynamics:

    ṡ_l = −∂E/∂s_l = −s_l + ρ'(s_l) ⊙ (W_l ρ(s_{l−1}) + W_{l+1}ᵀ ρ(s_{l+1}) + b_l)

Rows are samples: a layer has shape ``(B, n_l)`` and ``W_l`` (shape ``(n_l, n_{l−1})``) acts as
``ρ(s_{l−1}) @ W_lᵀ``. Equilibrium propagation trains it (docs/guide.md, "Equilibrium propagation").

References: Scellier & Bengio (2017), Equilibrium propagation, Front. Comput. Neurosci. 11:24;
Laborieux et al. (2021), Scaling equilibrium propagation to deep ConvNets, Front. Neurosci. 15:633674.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import EquilibriumSystem, sizes_check, uniform_init_

RATES = ("hard_sigmoid", "sigmoid", "tanh")
READOUTS = ("layer", "linear")


class HopfieldEquilibrium(EquilibriumSystem):
    """Layered continuous Hopfield network, an energy-based equilibrium system.

    With ``sizes = [n_0, n_1, …, n_L]`` (input, hidden layers, output) the hidden population ``v``
    is the concatenation of the layers ``s_1 … s_{L−1}`` (as in :class:`FeedforwardEquilibrium`)
    and the output population ``o`` is what the loss reads. Two readouts:

    - ``readout="layer"`` (Scellier & Bengio 2017): ``o = s_L`` is the top layer of the energy
      above, coupled back to ``s_{L−1}`` by ``W_L``; a cost on ``o`` nudges it directly.
    - ``readout="linear"`` (Laborieux et al. 2021, their cross-entropy set-up): the energy holds
      the hidden layers only, and ``o`` follows a linear readout of the top one,
      ``ȯ = r − o`` with ``r = W_L ρ(s_{L−1}) + b_L``, so ``o = r`` at every equilibrium. A cost
      ``C(o)`` is then a cost of the top layer, ``C(r(s_{L−1}))``: a nudge of ``o`` is passed to
      ``s_{L−1}`` as ``ρ'(s_{L−1}) ⊙ W_Lᵀ(−β ∂C/∂o)`` (:meth:`nudged_dynamics`), and ``W_L``,
      ``b_L`` learn from ``∂C/∂W_L``, ``∂C/∂b_L`` (:meth:`energy_param_grad` with the force).

    Rates ``ρ`` (``rate``):

    - ``hard_sigmoid`` (default, the papers'): ``ρ(s) = clamp(s, 0, 1)``. Its ``−∂E/∂s`` jumps
      where a unit saturates, so the dynamics have no zero there and no Euler step settles;
      Scellier & Bengio clip the state to [0, 1] after each step, Laborieux et al. iterate
      ``s_l ← σ(d_l)``. The field here is that projected step's residual,
      ``f_l = clamp(d_l, 0, 1) − s_l`` with ``d_l = W_l ρ(s_{l−1}) + W_{l+1}ᵀ ρ(s_{l+1}) + b_l``:
      its fixed points are the papers', it is continuous, it keeps a state started in [0, 1]
      there, and it equals ``−∂E/∂s`` inside the box wherever ``0 ≤ d ≤ 1``.
    - ``sigmoid``, ``tanh``: smooth rates; the field of the energy's layers is exactly ``−∂E/∂s``
      (for gradient checks: finite differences across the hard sigmoid's kinks are unreliable).

    Equilibrium propagation (``ep``, ``ep-centered``) reads :meth:`energy`, :meth:`nudged_dynamics`
    and :meth:`energy_param_grad`; every other method trains it through the generic system
    protocol (autograd vector-Jacobian products).

    Args:
        sizes: ``[n_in, hidden…, n_out]``, at least one hidden layer.
        rate: ``hard_sigmoid``, ``sigmoid`` or ``tanh``. readout: ``layer`` or ``linear``.
        dtype: parameter dtype. generator: optional RNG for the initialisation (PyTorch's linear
            layers': U(−1/√fan_in, 1/√fan_in) for weights and biases).

    Raises:
        ValueError: bad ``sizes``. ConfigError: an unknown ``rate``, ``readout`` or ``init``.

    >>> net = HopfieldEquilibrium([4, 5, 6, 3])
    >>> net.population_sizes(), net.settle_steps
    ({'v': 11, 'o': 3}, None)
    """

    def __init__(self, sizes: Sequence[int] = (784, 256, 256, 10), *, rate: str = "hard_sigmoid",
                 readout: str = "layer", init: str | None = None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        sizes = sizes_check(sizes)
        if rate not in RATES:
            raise ConfigError(f"unknown rate '{rate}' of the hopfield system; valid: {', '.join(RATES)}")
        if readout not in READOUTS:
            raise ConfigError(f"unknown readout '{readout}' of the hopfield system; valid: {', '.join(READOUTS)}")
        if init not in (None, "glorot"):
            raise ConfigError(f"unknown init '{init}' of the hopfield system; valid: glorot (or none: PyTorch's draw)")
        self.sizes, self.rate, self.readout_kind = sizes, rate, readout
        self.n_in, self.n_out = sizes[0], sizes[-1]
        self.hidden_sizes = sizes[1:-1]
        self.W = nn.ParameterList()
        self.b = nn.ParameterList()
        for n_prev, n_next in zip(sizes[:-1], sizes[1:]):
            if init == "glorot":
                bound = (6.0 / (n_prev + n_next)) ** 0.5
                W = torch.empty(n_next, n_prev, dtype=dtype).uniform_(-bound, bound, generator=generator)
                b = torch.zeros(n_next, dtype=dtype)
            else:
                W = uniform_init_(torch.empty(n_next, n_prev, dtype=dtype), n_prev, generator)
                b = uniform_init_(torch.empty(n_next, dtype=dtype), n_prev, generator)
            self.W.append(nn.Parameter(W))
            self.b.append(nn.Parameter(b))

    # --- rates ----------------------------------------------------------------------------
    def rho(self, s: torch.Tensor) -> torch.Tensor:
        """The rate ``ρ(s)``."""
        if self.rate == "hard_sigmoid":
            return s.clamp(0.0, 1.0)
        return torch.sigmoid(s) if self.rate == "sigmoid" else torch.tanh(s)

    def _rho_and_slope(self, s: torch.Tensor):
        if self.rate == "hard_sigmoid":
            # Autograd's slope of clamp: 1 on the closed interval [0, 1].
            return s.clamp(0.0, 1.0), ((s >= 0) & (s <= 1)).to(s.dtype)
        r = torch.sigmoid(s) if self.rate == "sigmoid" else torch.tanh(s)
        return r, (r * (1.0 - r) if self.rate == "sigmoid" else 1.0 - r * r)

    # --- the system protocol ------------------------------------------------------------------
    def population_sizes(self) -> Dict[str, int]:
        return {"v": sum(self.hidden_sizes), "o": self.n_out}

    def blocks(self, v: torch.Tensor):
        """Split the hidden state into its layers ``s_1 … s_{L−1}`` (views)."""
        return torch.split(v, self.hidden_sizes, dim=-1)

    def encode(self, x):
        """The input's drive of the first layer, ``W_1 x + b_1`` (x is clamped: ``W_1`` acts one way)."""
        return torch.addmm(self.b[0], x, self.W[0].t())

    def _layers(self, state):
        """The layers of the energy: ``s_1 … s_L`` (``o = s_L``), or for the linear readout ``s_1 … s_{L−1}``."""
        layers = list(self.blocks(state["v"]))
        return layers + [state["o"]] if self.readout_kind == "layer" else layers

    def _readout(self, top_rate: torch.Tensor) -> torch.Tensor:
        """``r = W_L ρ(s_{L−1}) + b_L`` (linear readout)."""
        return torch.addmm(self.b[-1], top_rate, self.W[-1].t())

    def dynamics(self, state, drive):
        return self.nudged_dynamics(state, drive, None)

    def nudged_dynamics(self, state: Mapping[str, torch.Tensor], drive, force: Mapping[str, torch.Tensor] | None):
        """``−∂(E + βC)/∂s``: the dynamics with an external force ``−β ∂C/∂o`` on the output (``force``).

        For the smooth rates the force joins ``−∂E/∂s``. For the hard sigmoid it enters the clamp
        with the drive (``clamp(d_l − β ∂C/∂s_l, 0, 1) − s_l``), as in the papers' clipped steps,
        so a saturated unit stays saturated under a weak nudge: the nudged equilibrium is the
        total energy's stationary point in the box [0, 1]. With the linear readout the force on
        ``o`` acts on the top layer, ``ρ'(s_{L−1}) ⊙ W_Lᵀ force`` (``o`` itself follows ``r``).

        Args:
            state: ``{"v": (B, Σ hidden), "o": (B, n_out)}``. drive: :meth:`encode`'s output.
            force: ``{"o": (B, n_out)}`` (and optionally ``"v"``), or ``None``: the free dynamics.
        Returns:
            One tensor per population, the shapes of ``state``.
        """
        force = force or {}
        layers = self._layers(state)
        pairs = [self._rho_and_slope(s) for s in layers]
        rates = [r for r, _ in pairs]
        K = len(layers)
        # d_l = W_l ρ(s_{l−1}) + b_l + W_{l+1}ᵀ ρ(s_{l+1}); the first layer's bottom-up part is the drive.
        d = [drive] + [torch.addmm(self.b[k], rates[k - 1], self.W[k].t()) for k in range(1, K)]
        for k in range(K - 1):
            d[k] = d[k] + rates[k + 1] @ self.W[k + 1]
        # Forces on the states themselves (−β ∂C/∂s_l), and the linear readout's force, which reaches
        # the top layer through its rate: −β ∂C(r(s_{L−1}))/∂s_{L−1} = ρ'(s_{L−1}) ⊙ (force_o W_L).
        direct = list(self.blocks(force["v"])) if "v" in force else [None] * len(self.hidden_sizes)
        through = [None] * K
        if self.readout_kind == "layer":
            direct.append(force.get("o"))
        elif force.get("o") is not None:
            through[-1] = force["o"] @ self.W[-1]
        out = []
        for s, (_, slope), dk, push, inner in zip(layers, pairs, d, direct, through):
            dk = dk if inner is None else dk + inner
            if self.rate == "hard_sigmoid":   # inside the box ρ' = 1: every force joins the clamp
                out.append((dk if push is None else dk + push).clamp(0.0, 1.0) - s)
            else:
                fk = slope * dk - s
                out.append(fk if push is None else fk + push)
        n_hidden = len(self.hidden_sizes)
        f = {"v": torch.cat(out[:n_hidden], dim=-1)}
        f["o"] = out[-1] if self.readout_kind == "layer" else self._readout(rates[-1]) - state["o"]
        return f

    # --- the energy ----------------------------------------------------------------------------
    def energy(self, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-sample energy ``E(s)``, shape ``(B,)`` (of the hidden layers only for the linear readout).

        Args:
            state: ``{"v", "o"}`` as :meth:`population_sizes`. x: validated input ``(B, n_in)``.
        """
        layers = self._layers(state)
        rates = [self.rho(s) for s in layers]
        bottom_up = [self.encode(x)] + [torch.addmm(self.b[k], rates[k - 1], self.W[k].t())
                                        for k in range(1, len(layers))]
        return sum(0.5 * s.pow(2).sum(-1) - (r * u).sum(-1) for s, r, u in zip(layers, rates, bottom_up))

    @torch.no_grad()
    def energy_param_grad(self, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                          force: Mapping[str, torch.Tensor] | None = None) -> Dict[str, torch.Tensor]:
        """``∂(E + βC)/∂θ`` at ``state``, summed over the batch, one tensor per named parameter.

        Local: ``∂E/∂W_l = −Σ_b ρ(s_l) ρ(s_{l−1})ᵀ`` and ``∂E/∂b_l = −Σ_b ρ(s_l)`` (``ρ(s_0) = x``).
        With the linear readout the cost depends on ``W_L``, ``b_L``: given the force
        ``−β ∂C/∂o`` (``force["o"]``) they get ``β ∂C/∂W_L = −Σ_b force ρ(s_{L−1})ᵀ`` and
        ``−Σ_b force`` (zero without a force: the free phase). The layer readout's cost reads the
        state only, so the force adds nothing there.
        """
        layers = self._layers(state)
        rates = [self.rho(s) for s in layers]
        grads = {}
        for k, (post, pre) in enumerate(zip(rates, [x] + rates[:-1])):
            grads[f"W.{k}"] = -(post.t() @ pre)
            grads[f"b.{k}"] = -post.sum(0)
        if self.readout_kind == "linear":
            K = len(layers)
            push = (force or {}).get("o")
            if push is None:
                push = torch.zeros_like(state["o"])
            grads[f"W.{K}"] = -(push.t() @ rates[-1])
            grads[f"b.{K}"] = -push.sum(0)
        return grads
