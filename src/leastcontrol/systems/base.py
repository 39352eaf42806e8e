"""What an equilibrium system is.

A system has parameters θ, a state ``s`` made of named populations (for the
built-in networks: hidden ``v`` and output ``o``), and free dynamics

    ds/dt = f(s, θ, x),          f(s°, θ, x) = 0 at the free equilibrium s°.

A new system subclasses :class:`EquilibriumSystem` and writes
:meth:`encode` (the parameter-dependent input drive, computed once per batch)
and :meth:`dynamics` (``f``). Everything else — state layout, vector-Jacobian
products in the state and in θ — has generic defaults; the built-ins override
the state VJP with a closed form because the controlled dynamics call it
every step.

Reference: Meulemans et al., "The least-control principle for local learning
at equilibrium", NeurIPS 2022, §2.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError

State = Dict[str, torch.Tensor]


class EquilibriumSystem(nn.Module):
    """Base class of equilibrium systems ``ṡ = f(s, θ, x)``.

    Subclasses set :attr:`n_in` and :attr:`n_out` (integers) and their parameters in ``__init__``
    and implement :meth:`population_sizes`, :meth:`encode` and :meth:`dynamics`; the output
    population (``"o"``, or set :attr:`output_population`) is what the loss reads. Everything else
    has a generic default (:meth:`check_protocol` says what is missing).

    Attributes:
        output_population: name of the population the loss reads (``"o"``).
        settle_steps: for layered (feedforward) systems, the number of Euler
            steps with ``dt = 1`` that reach the exact equilibrium from the zero
            state; ``None`` for genuinely recurrent systems.
    """

    output_population: str = "o"
    settle_steps: int | None = None
    n_in: int
    n_out: int

    # --- what a subclass writes -------------------------------------------------
    def population_sizes(self) -> Dict[str, int]:
        """Ordered mapping population name -> number of units (per sample)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor):
        """Parameter-dependent input drive (e.g. ``U x + b``), computed once per batch.

        Args:
            x: validated input, shape ``(B, n_in)``.
        """
        raise NotImplementedError

    def dynamics(self, state: Mapping[str, torch.Tensor], drive) -> State:
        """The free dynamics ``f(s, θ, x)``: one tensor per population, shapes of ``state``."""
        raise NotImplementedError

    def population_shapes(self) -> Dict[str, tuple]:
        """Per-sample shape of every population (default: flat vectors; conv systems: ``(C, H, W)``)."""
        return {name: (n,) for name, n in self.population_sizes().items()}

    def observe_equilibrium(self, state: Mapping[str, torch.Tensor]) -> None:
        """Called with every training batch's free equilibrium (e.g. to update normalisation statistics)."""

    # --- generic machinery ------------------------------------------------------
    @property
    def is_feedforward(self) -> bool:
        return self.settle_steps is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_protocol(self) -> None:
        """Check, once, that this system has what the library reads of it: ``n_in`` and ``n_out``
        (positive integers), parameters, ``population_sizes()`` naming the ``output_population``, and
        its own ``encode`` and ``dynamics``.

        Raises:
            ConfigError: naming what is missing and where to set it.
        """
        if getattr(self, "_protocol_checked", False):
            return
        cls = type(self).__name__
        guide = "(docs/guide.md, 'A new system')"
        for attr, what in (("n_in", "input features per sample"), ("n_out", "output units the loss reads")):
            value = getattr(self, attr, None)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{cls} must set self.{attr} ({what}, a positive integer) in __init__ {guide}")
        for method in ("encode", "dynamics", "population_sizes"):
            if getattr(type(self), method) is getattr(EquilibriumSystem, method):
                raise ConfigError(f"{cls} must define {method}() {guide}")
        if next(iter(self.parameters()), None) is None:
            raise ConfigError(f"{cls} has no parameters: the methods learn its nn.Parameters {guide}")
        sizes = self.population_sizes()
        if not isinstance(sizes, Mapping) or self.output_population not in sizes:
            raise ConfigError(f"{cls}.population_sizes() must map population names to widths and include the output "
                              f"population '{self.output_population}' (or set output_population) {guide}")
        self._protocol_checked = True

    def prepare_input(self, x) -> torch.Tensor:
        """Validate an input batch and flatten it to ``(B, n_in)`` in the system's dtype.

        Accepts ``(B, n_in)`` or any image shape ``(B, *dims)`` with
        ``prod(dims) == n_in``.

        Raises:
            ValueError: wrong type, non-floating dtype, wrong feature size, NaN/Inf.
            ConfigError: the system lacks what the library needs (:meth:`check_protocol`).
        """
        self.check_protocol()
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input must be a torch.Tensor of shape (batch, {self.n_in}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"input must be floating point (got dtype {x.dtype}); scale integer pixels to [0, 1] first"
            )
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.n_in:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected (batch, {self.n_in}) or (batch, *dims) "
                f"with {self.n_in} features per sample"
            )
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        if not torch.isfinite(x).all():
            raise ValueError("input batch contains NaN or Inf values; clean the data before training")
        return x.reshape(x.shape[0], self.n_in).to(dtype=self.dtype, device=self.device)

    def init_state(self, batch_size: int) -> State:
        """The zero state, one ``(B, *shape)`` tensor per population."""
        return {
            name: torch.zeros(batch_size, *shape, dtype=self.dtype, device=self.device)
            for name, shape in self.population_shapes().items()
        }

    def readout(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model output read from a state: the output population (logits)."""
        return state[self.output_population]

    def state_vjp(self, state: Mapping[str, torch.Tensor], drive, cotangent: Mapping[str, torch.Tensor]) -> State:
        """``(∂_s f)ᵀ c`` for a cotangent ``c`` shaped like the state (generic: ``torch.func.vjp``)."""
        return self.dynamics_and_state_vjp(state, drive, cotangent)[1]

    def dynamics_and_state_vjp(self, state, drive, cotangent, feedback=None):
        """``(f(s), (∂_s f)ᵀ c)`` with one forward evaluation and one VJP.

        ``feedback`` (systems with :meth:`feedback_pathways` only) maps a pathway
        to a matrix used in place of the transpose of its forward weight.
        """
        if feedback is not None:
            raise ValueError(f"{type(self).__name__} has no feedback pathways; "
                             "lcp-kp needs a built-in system (ff or rnn)")
        drive = _detach(drive)
        primal = {k: v.detach() for k, v in state.items()}
        f, vjp_fn = torch.func.vjp(lambda s: self.dynamics(s, drive), primal)
        return f, vjp_fn(dict(cotangent))[0]

    # --- flat fast path ------------------------------------------------------------
    def flat_order(self) -> list:
        """Population order of the flat state: hidden populations, then the output population last."""
        names = [n for n in self.population_sizes() if n != self.output_population]
        return names + [self.output_population]

    def flat_operator(self, feedback=None) -> "FlatOperator":
        """The dynamics and their state VJP on one flat ``(B, N)`` buffer (see :class:`FlatOperator`).

        Weights are read (and for the built-ins stacked) once, so call it once
        per solve, after the last parameter update.
        """
        return FlatOperator(self, feedback)

    def rate_slope(self, state: Mapping[str, torch.Tensor]) -> State:
        """The slope of the rate each non-output unit sends on with respect to its state (``φ'(v)`` for a
        state of potentials, 1 for a state of rates), for rules that modulate a feedback signal by it."""
        raise ValueError(f"{type(self).__name__} does not define rate_slope; lcp-lf needs a built-in system (ff or rnn)")

    # --- feedback pathways (Kolen-Pollack) -----------------------------------------
    def feedback_pathways(self) -> Dict[str, str]:
        """Pathway key -> name of the forward weight whose transpose carries the VJP.

        Empty for systems whose VJP has no explicit weight transposes.
        """
        return {}

    def add_feedback(self, generator: torch.Generator | None = None) -> nn.ParameterDict:
        """Create separate feedback weights, one per pathway, random with unit Frobenius norm.

        They are parameters of the system (``self.feedback``), so they are saved
        with its ``state_dict`` and visible to an optimizer built afterwards.
        """
        if not self.feedback_pathways():
            raise ValueError(f"{type(self).__name__} has no feedback pathways; "
                             "lcp-kp needs a built-in system (ff or rnn)")
        if getattr(self, "feedback", None) is None:
            params = dict(self.named_parameters())
            fb = nn.ParameterDict()
            for key, name in self.feedback_pathways().items():
                shape = self.mirror(key, params[name]).shape
                m = self.feedback_draw(key, shape, generator).to(self.device)
                fb[key] = nn.Parameter(m / m.norm())
            self.feedback = fb
        return self.feedback

    def feedback_draw(self, key: str, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random matrix a feedback weight starts from (before it is scaled to unit norm): N(0, 1)."""
        return torch.randn(shape, generator=generator, dtype=self.dtype)

    def mirror(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """A forward weight (or its update) in the layout of its feedback weight: the transpose.

        Convolutional pathways keep the kernel's own layout (the feedback runs as a transposed
        convolution with its own kernel).
        """
        return weight.t()

    def pathway(self, key: str, weight: torch.Tensor, feedback) -> torch.Tensor:
        """The matrix M with ``a @ M`` the backward pass through ``weight``: W itself, or a feedback Bᵀ."""
        return weight if feedback is None else feedback[key].t()

    def param_vjp(self, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                  cotangent: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``(∂_θ f(s, θ, x))ᵀ c`` summed over the batch, one tensor per named parameter.

        The state is held fixed (detached); the input drive is recomputed with
        the graph so parameters of :meth:`encode` receive their share.
        """
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            f = self.dynamics({k: v.detach() for k, v in state.items()}, self.encode(x))
            keys = [k for k in f if k in cotangent]
            grads = torch.autograd.grad(
                [f[k] for k in keys], [p for _, p in named],
                grad_outputs=[cotangent[k] for k in keys], allow_unused=True,
            )
        return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, grads)}


def autograd_dynamics_and_state_vjp(system: EquilibriumSystem, state, drive, cotangent, feedback=None):
    """``(f(s), (∂_s f)ᵀ c)`` the plain way: build the graph of ``f`` and call ``torch.autograd.grad``.

    This is how the published research code runs every step of the controlled
    and adjoint dynamics. It is kept as the reference path (``impl="autograd"``)
    for cross-checks and as the speed baseline; :meth:`EquilibriumSystem.dynamics_and_state_vjp`
    is the fast path. Feedback weights (Kolen-Pollack) have no autograd form,
    so with ``feedback`` the system's own pass is used.
    """
    if feedback is not None:
        return system.dynamics_and_state_vjp(state, drive, cotangent, feedback=feedback)
    drive = _detach(drive)
    with torch.enable_grad():
        primal = {k: v.detach().requires_grad_(True) for k, v in state.items()}
        f = system.dynamics(primal, drive)
        keys = [k for k in f if k in cotangent]
        grads = torch.autograd.grad([f[k] for k in keys], [primal[k] for k in primal],
                                    grad_outputs=[cotangent[k] for k in keys], allow_unused=True)
    back = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(primal.items(), grads)}
    return {k: v.detach() for k, v in f.items()}, back


class FlatOperator:
    """``f`` and ``(∂_s f)ᵀ a`` on flat states, for solvers that step one buffer.

    A flat state is the populations of :meth:`EquilibriumSystem.flat_order`
    concatenated along the feature axis, shape ``(B, N)``. This generic version
    splits the buffer and calls the system's dict methods; the built-in
    networks override it with a few fused kernels per step.

    Attributes:
        sizes: population name -> width, in flat order.
        n_state: ``N``.
    """

    def __init__(self, system: EquilibriumSystem, feedback=None):
        self.system, self.feedback = system, feedback
        widths, shapes = system.population_sizes(), system.population_shapes()
        self.sizes = {n: widths[n] for n in system.flat_order()}
        self.shapes = {n: tuple(shapes[n]) for n in self.sizes}
        self.n_state = sum(self.sizes.values())

    def drive(self, x: torch.Tensor):
        """The input drive the other methods read (here: whatever ``encode`` returns)."""
        return self.system.encode(x)

    def pack(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].reshape(state[n].shape[0], -1) for n in self.sizes], dim=1)

    def unpack(self, flat: torch.Tensor) -> State:
        """The populations of a flat ``(B, N)`` buffer, as views in their natural shapes ``(B, *shape)``."""
        parts = torch.split(flat, list(self.sizes.values()), dim=1)
        return {n: p.reshape(p.shape[0], *self.shapes[n]) for n, p in zip(self.sizes, parts)}

    def f(self, s: torch.Tensor, drive) -> torch.Tensor:
        return self.pack(self.system.dynamics(self.unpack(s), drive))

    def f_and_vjp(self, s: torch.Tensor, drive, a: torch.Tensor):
        options = {} if self.feedback is None else {"feedback": self.feedback}
        f, back = self.system.dynamics_and_state_vjp(self.unpack(s), drive, self.unpack(a), **options)
        return self.pack(f), self.pack(back)

    def vjp(self, s: torch.Tensor, drive, a: torch.Tensor) -> torch.Tensor:
        return self.f_and_vjp(s, drive, a)[1]

    def linearize(self, s: torch.Tensor, drive) -> torch.Tensor:
        """What :meth:`vjp_at` needs of a fixed state ``s``, batch first (solvers subset it with the
        batch). Here ``s`` itself; the built-in networks keep only the slopes ``φ'(v)``."""
        return s

    def vjp_at(self, lin: torch.Tensor, drive, a: torch.Tensor) -> torch.Tensor:
        """``(∂_s f(s))ᵀ a`` at the state that ``lin = linearize(s, drive)`` describes: for the adjoint
        dynamics, where ``s`` stays fixed while ``a`` moves, so the slopes are computed once."""
        return self.vjp(lin, drive, a)


class AutogradFlatOperator(FlatOperator):
    """The reference flat operator: every VJP is one ``torch.autograd.grad`` call (research-code style)."""

    def f_and_vjp(self, s: torch.Tensor, drive, a: torch.Tensor):
        f, back = autograd_dynamics_and_state_vjp(self.system, self.unpack(s), drive, self.unpack(a), self.feedback)
        return self.pack(f), self.pack(back)


def _detach(drive):
    if isinstance(drive, torch.Tensor):
        return drive.detach()
    if isinstance(drive, (tuple, list)):
        return type(drive)(_detach(d) for d in drive)
    if isinstance(drive, dict):
        return {k: _detach(v) for k, v in drive.items()}
    return drive


def uniform_init_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch's default linear-layer initialisation: U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def sizes_check(sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) < 3 or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be [n_in, hidden..., n_out] with at least one hidden layer and positive entries, got {sizes}")
    return sizes
