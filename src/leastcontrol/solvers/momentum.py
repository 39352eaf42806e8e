"""Gradient descent with heavy-ball momentum on a gradient field ``g = −∇E`` (SGD with momentum on the state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Solver, _number, register_solver
from .field import relative_residual


@register_solver("momentum")
@dataclass(repr=False)
class Momentum(Solver):
    """Each sample's state moves as a parameter under ``torch.optim.SGD(momentum=μ)`` (and optax's
    ``sgd(lr, momentum=μ)``) would with the gradient ``∇E = −g``::

        m_t = μ m_{t−1} + ∇E(s_{t−1}),   m_0 = 0
        s_t = s_{t−1} − lr m_t

    For energies minimised over the state (predictive coding's inference, as pcx runs it). ``dt`` is
    not used, the step is ``lr``; ``μ = 0`` is Euler with ``dt = lr``. The relative residual of a step
    is ``‖s_t − s_{t−1}‖ / ‖s_{t−1}‖``; with ``tol = 0`` every sample takes ``max_steps`` steps.

    Args:
        lr: the step size. momentum: ``μ`` in [0, 1).

    Raises:
        ConfigError: ``lr`` not > 0, ``momentum`` outside [0, 1).
    """

    lr: float = 0.01
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        _number("lr", self.lr)
        if not (isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool)
                and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def init(self, fn, z, context):
        return torch.zeros_like(z)

    def step(self, fn, z, context, carry, t, groups):
        m = carry.mul(self.momentum).sub_(fn(z, context))   # + ∇E = − g
        z_next = z.add(m, alpha=-self.lr)
        return z_next, relative_residual(z_next - z, z, groups), m
