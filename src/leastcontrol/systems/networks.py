"""The equilibrium networks of the LCP paper (§1 of docs/LCP.md).

Both are rate networks with output units ``o`` that read the hidden rates; the loss is taken on
``o`` (logits). The recurrent network's rate is ``φ = tanh``; the layered one's is a choice
(:data:`ACTIVATIONS`, default ``tanh``). Rows are samples: a state population has shape ``(B, n)``
and weights act as ``φ(v) @ Wᵀ``.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import EquilibriumSystem, FlatOperator, sizes_check, uniform_init_

# The rates a layered network may use; each with its exact derivative (:func:`activation_and_slope`).
ACTIVATIONS = ("tanh", "gelu", "relu", "sigmoid", "hard_tanh")
# What the hidden state of a layered network holds: the units' potentials or their rates.
STATE_FORMS = ("potential", "rate")

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _tanh_and_slope(v: torch.Tensor):
    r = torch.tanh(v)
    return r, 1.0 - r * r


def activation(name: str, v: torch.Tensor) -> torch.Tensor:
    """``φ(v)`` for a name of :data:`ACTIVATIONS`."""
    if name == "tanh":
        return torch.tanh(v)
    if name == "gelu":
        return F.gelu(v, approximate="tanh")
    if name == "relu":
        return torch.relu(v)
    if name == "sigmoid":
        return torch.sigmoid(v)
    return F.hardtanh(v)


def activation_and_slope(name: str, v: torch.Tensor):
    """``(φ(v), φ'(v))`` for a name of :data:`ACTIVATIONS`.

    - ``tanh``: ``φ' = 1 − φ²``.
    - ``gelu``: the tanh approximation (``F.gelu(v, approximate="tanh")``, JAX's default),
      ``φ(v) = ½ v (1 + tanh u)``, ``u = k (v + c v³)``, ``k = √(2/π)``, ``c = 0.044715``, so
      ``φ'(v) = ½ (1 + tanh u) + ½ v (1 − tanh² u) k (1 + 3 c v²)``.
    - ``relu``: ``φ' = 1`` where ``v > 0``, else 0 (autograd's choice at 0).
    - ``sigmoid``: ``φ' = φ (1 − φ)``.
    - ``hard_tanh``: ``φ = clamp(v, −1, 1)``, ``φ' = 1`` strictly inside (−1, 1), else 0 (autograd's
      choice at the kinks).
    """
    if name == "tanh":
        return _tanh_and_slope(v)
    if name == "gelu":
        t = torch.tanh(_GELU_K * (v + _GELU_C * v * v * v))
        slope = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * (_GELU_K * (1.0 + 3.0 * _GELU_C * v * v))
        return F.gelu(v, approximate="tanh"), slope
    if name == "relu":
        return torch.relu(v), (v > 0).to(v.dtype)
    if name == "sigmoid":
        r = torch.sigmoid(v)
        return r, r * (1.0 - r)
    return F.hardtanh(v), ((v > -1.0) & (v < 1.0)).to(v.dtype)


def _layer_like_feedback(system, key, shape, generator=None):
    """Feedback draws as in the paper's research code, so a seed gives its feedback weights too.

    The readout's D̃ is Gaussian; a layer's B is drawn like a fresh linear layer of its shape,
    U(−1/√fan_in, 1/√fan_in). Both are then scaled to unit norm (:meth:`add_feedback`).
    """
    if key == "D":
        return torch.randn(shape, generator=generator, dtype=system.dtype)
    return uniform_init_(torch.empty(shape, dtype=system.dtype), shape[1], generator)


class RecurrentEquilibrium(EquilibriumSystem):
    """Fully recurrent tanh network.

        v̇ = −v + W φ(v) + U x + b
        ȯ = −o + D φ(v) + c

    Args:
        n_in: input features. n_hidden: recurrent units. n_out: output units.
        recurrent_bias: also give the recurrent layer its own bias ``b_W`` (``W φ(v) + b_W``), as
            the paper's research code does (its input and recurrent layers each carry a bias).
            The sum ``b + b_W`` is the same equation, but two parameters with one gradient move
            the bias twice as fast under Adam, and the initialisation draws one more vector, so
            runs pair with the research code's only with it.
        dtype: parameter dtype. generator: optional RNG for the initialisation.

    >>> net = RecurrentEquilibrium(4, 8, 3)
    >>> sorted(net.population_sizes().items())
    [('o', 3), ('v', 8)]
    """

    def __init__(self, n_in: int = 784, n_hidden: int = 256, n_out: int = 10, *, recurrent_bias: bool = False,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        sizes_check([n_in, n_hidden, n_out])
        self.n_in, self.n_hidden, self.n_out = int(n_in), int(n_hidden), int(n_out)
        H = self.n_hidden
        self.U = nn.Parameter(uniform_init_(torch.empty(H, n_in, dtype=dtype), n_in, generator))
        self.b = nn.Parameter(uniform_init_(torch.empty(H, dtype=dtype), n_in, generator))
        self.W = nn.Parameter(uniform_init_(torch.empty(H, H, dtype=dtype), H, generator))
        if recurrent_bias:
            self.b_W = nn.Parameter(uniform_init_(torch.empty(H, dtype=dtype), H, generator))
        else:
            self.register_parameter("b_W", None)
        self.D = nn.Parameter(uniform_init_(torch.empty(n_out, H, dtype=dtype), H, generator))
        self.c = nn.Parameter(uniform_init_(torch.empty(n_out, dtype=dtype), H, generator))

    def population_sizes(self) -> Dict[str, int]:
        return {"v": self.n_hidden, "o": self.n_out}

    def encode(self, x):
        # The recurrent bias is constant in the state, so it joins the input drive.
        b = self.b if self.b_W is None else self.b + self.b_W
        return torch.addmm(b, x, self.U.t())

    def dynamics(self, state, drive):
        r = torch.tanh(state["v"])
        return {
            "v": torch.addmm(drive, r, self.W.t()) - state["v"],
            "o": torch.addmm(self.c, r, self.D.t()) - state["o"],
        }

    def feedback_pathways(self):
        return {"W": "W", "D": "D"}

    feedback_draw = _layer_like_feedback

    def rate_slope(self, state):
        return {"v": 1.0 - torch.tanh(state["v"]).pow(2)}

    def dynamics_and_state_vjp(self, state, drive, cotangent, feedback=None):
        # Closed form: (∂_v f)ᵀ a = −a_v + φ'(v) ⊙ (a_v W + a_o D),  (∂_o f)ᵀ a = −a_o;
        # with feedback, W and D on the way back are replaced by Bᵀ and D̃ᵀ.
        v, o = state["v"], state["o"]
        a_v, a_o = cotangent["v"], cotangent["o"]
        r, slope = _tanh_and_slope(v)
        f = {"v": torch.addmm(drive, r, self.W.t()) - v, "o": torch.addmm(self.c, r, self.D.t()) - o}
        back = torch.addmm(a_v @ self.pathway("W", self.W, feedback), a_o, self.pathway("D", self.D, feedback))
        return f, {"v": slope * back - a_v, "o": -a_o}

    def flat_operator(self, feedback=None):
        return _RecurrentFlat(self, feedback)

    def param_vjp(self, state, x, cotangent):
        # Local outer products: postsynaptic cotangent times presynaptic rate (or input).
        r = torch.tanh(state["v"])
        c_v, c_o = cotangent["v"], cotangent["o"]
        grads = {"U": c_v.t() @ x, "b": c_v.sum(0), "W": c_v.t() @ r, "D": c_o.t() @ r, "c": c_o.sum(0)}
        if self.b_W is not None:
            grads["b_W"] = grads["b"].clone()   # its own tensor: a caller may scale one in place
        return grads


class _RecurrentFlat(FlatOperator):
    """Fused flat step of :class:`RecurrentEquilibrium` on ``s = [v | o]``.

    With the readout stacked under the recurrent weights, ``M = [W; D]`` (or its
    feedback replacement on the way back) and the drive ``[Ux + b | c]``:

        f(s)      = φ(v) Mᵀ + drive − s                         (one matmul)
        (∂_s f)ᵀ a = −a + [φ'(v) ⊙ (a M) | 0]                   (one matmul)

    At a fixed state (the adjoint dynamics) :meth:`vjp_at` reads ``φ'(v)`` from :meth:`linearize`
    instead of recomputing ``tanh`` every step.
    """

    def __init__(self, system, feedback=None):
        super().__init__(system, feedback)
        self.H = system.n_hidden
        self.forward_t = torch.cat([system.W, system.D]).t().detach().contiguous()
        self.back = torch.cat([system.pathway("W", system.W, feedback),
                               system.pathway("D", system.D, feedback)]).detach().contiguous()

    def drive(self, x):
        d = self.system.encode(x)
        return torch.cat([d, self.system.c.expand(d.shape[0], -1)], dim=1)

    def f(self, s, drive):
        return torch.addmm(drive, torch.tanh(s[:, :self.H]), self.forward_t).sub_(s)

    def _vjp(self, r, a):
        bk = a @ self.back
        bk.addcmul_(bk * r, r, value=-1.0)          # φ'(v) ⊙ (a M), with φ' = 1 − φ²
        vjp = a.neg()
        vjp[:, :self.H] += bk
        return vjp

    def f_and_vjp(self, s, drive, a):
        r = torch.tanh(s[:, :self.H])
        return torch.addmm(drive, r, self.forward_t).sub_(s), self._vjp(r, a)

    def vjp(self, s, drive, a):
        return self._vjp(torch.tanh(s[:, :self.H]), a)

    def linearize(self, s, drive):
        r = torch.tanh(s[:, :self.H])
        return 1.0 - r * r                            # φ'(v), (B, H)

    def vjp_at(self, slope, drive, a):
        vjp = a.neg()
        vjp[:, :self.H] += (a @ self.back).mul_(slope)
        return vjp


class FeedforwardEquilibrium(EquilibriumSystem):
    """A layered network written as an equilibrium system.

    With ``sizes = [n_0, n_1, …, n_{L−1}, n_L]`` the hidden state ``v`` (shape ``(B, n_1 + … +
    n_{L−1})``) is the concatenation of the blocks ``h_1 … h_{L−1}`` (``h_l``: ``(B, n_l)``), the
    output ``o`` has shape ``(B, n_L)``, and ``φ`` is the rate (``activation``). Two forms of the
    same network (``state``):

    ``state="potential"`` (default): the blocks hold the units' potentials (pre-activations)::

        ḣ_1 = −h_1 + U x + b
        ḣ_l = −h_l + W_l φ(h_{l−1}) + b_l        (l = 2 … L−1)
        ȯ   = −o   + D φ(h_{L−1}) + c

    ``state="rate"``: the blocks hold the units' rates, and the output reads them linearly::

        ḣ_1 = −h_1 + φ(U x + b)
        ḣ_l = −h_l + φ(W_l h_{l−1} + b_l)        (l = 2 … L−1)
        ȯ   = −o   + D h_{L−1} + c

    Both have the ordinary forward pass as their equilibrium, with the same output ``o`` for the
    same parameters (the rate form's ``h_l`` is ``φ`` of the potential form's). They differ in what
    the dynamics measure away from it: predictive coding reads its errors ``ε = −f`` off them, so
    its energy ``½‖f‖²`` is ``Σ ½‖h_l − W_l φ(h_{l−1}) − b_l‖²`` (errors on potentials) in the
    first form and ``Σ ½‖h_l − φ(W_l h_{l−1} + b_l)‖²`` (errors on rates, as pcx's) in the second.

    The recurrent matrix is block-lower-triangular, so the equilibrium is reached from the zero
    state in ``L`` Euler steps with ``dt = 1`` (:attr:`settle_steps`) in either form: step ``l``
    fixes block ``l`` (the first depends on ``x`` only), then the output.

    Args:
        sizes: ``[n_in, hidden…, n_out]``, at least one hidden layer.
        activation: the rate ``φ``, one of :data:`ACTIVATIONS`: ``tanh`` (default), ``gelu`` (its tanh
            approximation), ``relu``, ``sigmoid``, ``hard_tanh``.
        state: ``potential`` (default) or ``rate``, as above.
        dtype: parameter dtype. generator: optional RNG for the initialisation (PyTorch's linear
            layers': U(−1/√fan_in, 1/√fan_in) for weights and biases).

    Raises:
        ValueError: bad ``sizes``. ConfigError: an unknown ``activation`` or ``state``, naming the
            valid ones.

    >>> net = FeedforwardEquilibrium([4, 5, 6, 3])
    >>> net.settle_steps, net.population_sizes()
    (3, {'v': 11, 'o': 3})
    """

    def __init__(self, sizes: Sequence[int] = (784, 256, 256, 10), *, activation: str = "tanh",
                 state: str = "potential", dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        sizes = sizes_check(sizes)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r} of the ff system; valid: {', '.join(ACTIVATIONS)}")
        if state not in STATE_FORMS:
            raise ConfigError(f"unknown state {state!r} of the ff system; valid: {', '.join(STATE_FORMS)}")
        self.activation, self.state_form = activation, state
        self.sizes = sizes
        self.n_in, self.n_out = sizes[0], sizes[-1]
        self.hidden_sizes = sizes[1:-1]
        self.settle_steps = len(sizes) - 1
        n0, n1 = sizes[0], sizes[1]
        self.U = nn.Parameter(uniform_init_(torch.empty(n1, n0, dtype=dtype), n0, generator))
        self.b = nn.Parameter(uniform_init_(torch.empty(n1, dtype=dtype), n0, generator))
        self.W = nn.ParameterList()
        self.b_W = nn.ParameterList()
        for n_prev, n_next in zip(self.hidden_sizes[:-1], self.hidden_sizes[1:]):
            self.W.append(nn.Parameter(uniform_init_(torch.empty(n_next, n_prev, dtype=dtype), n_prev, generator)))
            self.b_W.append(nn.Parameter(uniform_init_(torch.empty(n_next, dtype=dtype), n_prev, generator)))
        n_last = self.hidden_sizes[-1]
        self.D = nn.Parameter(uniform_init_(torch.empty(self.n_out, n_last, dtype=dtype), n_last, generator))
        self.c = nn.Parameter(uniform_init_(torch.empty(self.n_out, dtype=dtype), n_last, generator))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation!r}, state={self.state_form!r}"

    @property
    def holds_rates(self) -> bool:
        """Whether the hidden blocks hold rates (``state="rate"``) rather than potentials."""
        return self.state_form == "rate"

    def population_sizes(self) -> Dict[str, int]:
        return {"v": sum(self.hidden_sizes), "o": self.n_out}

    def blocks(self, v: torch.Tensor):
        """Split the hidden state into its layer blocks (views)."""
        return torch.split(v, self.hidden_sizes, dim=-1)

    def encode(self, x):
        return torch.addmm(self.b, x, self.U.t())

    def phi(self, v: torch.Tensor) -> torch.Tensor:
        """The rate ``φ(v)``."""
        return activation(self.activation, v)

    def _targets(self, rates, drive):
        # Potential form: what each population is driven towards, h_l* = W_l φ(h_{l−1}) + b_l.
        hidden = [drive] + [torch.addmm(b, r, W.t()) for W, b, r in zip(self.W, self.b_W, rates[:-1])]
        return torch.cat(hidden, dim=-1), torch.addmm(self.c, rates[-1], self.D.t())

    def _potentials(self, blocks, drive):
        # Rate form: each block's potential, W_l h_{l−1} + b_l (the first block's is the drive U x + b).
        return [drive] + [torch.addmm(b, h, W.t()) for W, b, h in zip(self.W, self.b_W, blocks[:-1])]

    def dynamics(self, state, drive):
        blocks = self.blocks(state["v"])
        if self.holds_rates:
            v_target = torch.cat([self.phi(p) for p in self._potentials(blocks, drive)], dim=-1)
            o_target = torch.addmm(self.c, blocks[-1], self.D.t())
        else:
            v_target, o_target = self._targets([self.phi(h) for h in blocks], drive)
        return {"v": v_target - state["v"], "o": o_target - state["o"]}

    def rate_slope(self, state):
        """The slope of the rate each hidden unit sends on with respect to its own state.

        Potential form: ``φ'(h)``. Rate form: 1, as the state is the rate itself; the slope of the
        unit's activation, ``φ'(W_l h_{l−1} + b_l)``, is part of ``∂f/∂θ`` there, so the local update
        (:meth:`param_vjp`) applies it already. LCP-LF modulates its feedback ``Q u`` by this before
        that update, which gives ``(φ'(potential) ⊙ Q u) · presynaptic rateᵀ`` in both forms.
        """
        v = state["v"]
        if self.holds_rates:
            return {"v": torch.ones_like(v)}
        if self.activation == "tanh":
            return {"v": 1.0 - torch.tanh(v).pow(2)}
        return {"v": activation_and_slope(self.activation, v)[1]}

    def feedback_pathways(self):
        pathways = {f"W_{i}": f"W.{i}" for i in range(len(self.W))}
        pathways["D"] = "D"
        return pathways

    feedback_draw = _layer_like_feedback

    def dynamics_and_state_vjp(self, state, drive, cotangent, feedback=None):
        """``(f(s), (∂_s f)ᵀ a)`` in closed form; with ``feedback``, the pathway matrices (``W_l``, ``D``)
        on the way back are replaced by the feedback weights (:meth:`pathway`).

        Potential form: block ``l−1`` receives ``φ'(h_{l−1}) ⊙ (a_l W_l)``, the last block
        ``φ'(h_{L−1}) ⊙ (a_o D)``. Rate form: block ``l−1`` receives ``(φ'(p_l) ⊙ a_l) W_l`` with
        ``p_l = W_l h_{l−1} + b_l`` its successor's potential, the last block ``a_o D``. Each block
        also gets ``−a_l`` (the leak), the output ``−a_o``.
        """
        blocks = self.blocks(state["v"])
        a_blocks = self.blocks(cotangent["v"])
        a_o = cotangent["o"]
        if self.holds_rates:
            pairs = [activation_and_slope(self.activation, p) for p in self._potentials(blocks, drive)]
            v_target = torch.cat([r for r, _ in pairs], dim=-1)
            o_target = torch.addmm(self.c, blocks[-1], self.D.t())
            back = [(slope * a_next) @ self.pathway(f"W_{i}", W, feedback)
                    for i, ((_, slope), a_next, W) in enumerate(zip(pairs[1:], a_blocks[1:], self.W))]
            back.append(a_o @ self.pathway("D", self.D, feedback))
            vjp_v = torch.cat(back, dim=-1) - cotangent["v"]
        else:
            pairs = [activation_and_slope(self.activation, h) for h in blocks]
            v_target, o_target = self._targets([r for r, _ in pairs], drive)
            back = [a_next @ self.pathway(f"W_{i}", W, feedback) for i, (a_next, W) in enumerate(zip(a_blocks[1:], self.W))]
            back.append(a_o @ self.pathway("D", self.D, feedback))
            vjp_v = torch.cat([slope * g for (_, slope), g in zip(pairs, back)], dim=-1) - cotangent["v"]
        f = {"v": v_target - state["v"], "o": o_target - state["o"]}
        return f, {"v": vjp_v, "o": -a_o}

    def param_vjp(self, state, x, cotangent):
        """``(∂_θ f)ᵀ c`` summed over the batch: local outer products, each block's cotangent times what
        the block reads (the input ``x``, or the rate of the block below).

        Potential form: ``c_l φ(h_{l−1})ᵀ``. Rate form: ``(φ'(p_l) ⊙ c_l) h_{l−1}ᵀ``, with ``p_l`` the
        block's potential (``U x + b`` for the first); the output's ``c_o h_{L−1}ᵀ`` in both forms
        reads the last block's rate.
        """
        blocks = self.blocks(state["v"])
        c_blocks = self.blocks(cotangent["v"])
        c_o = cotangent["o"]
        if self.holds_rates:
            with torch.no_grad():   # the slopes are read at θ, not differentiated through
                potentials = self._potentials(blocks, self.encode(x))
            c_blocks = [activation_and_slope(self.activation, p)[1] * c for p, c in zip(potentials, c_blocks)]
            rates = list(blocks)
        else:
            rates = [self.phi(h) for h in blocks]
        grads = {"U": c_blocks[0].t() @ x, "b": c_blocks[0].sum(0)}
        for i, (c_next, r_prev) in enumerate(zip(c_blocks[1:], rates[:-1])):
            grads[f"W.{i}"] = c_next.t() @ r_prev
            grads[f"b_W.{i}"] = c_next.sum(0)
        grads["D"] = c_o.t() @ rates[-1]
        grads["c"] = c_o.sum(0)
        return grads

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ordinary layer-by-layer forward pass; returns the output ``o`` (logits), the same in
        both forms."""
        x = self.prepare_input(x)
        h = self.encode(x)
        for W, b in zip(self.W, self.b_W):
            h = torch.addmm(b, self.phi(h), W.t())
        return torch.addmm(self.c, self.phi(h), self.D.t())
