"""Adam on a gradient field: ``g = −∇E``, for minimising an energy over the state."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Solver, _number, register_solver
from .field import relative_residual


@register_solver("adam")
@dataclass(repr=False)
class Adam(Solver):
    """Adam (Kingma & Ba 2015) on the state, for fields that are a negative gradient ``g = −∇E``:
    each sample's state moves as a parameter under ``torch.optim.Adam`` would with the gradient
    ``∇E = −g`` (same update, same bias correction; ``dt`` is not used, the step is ``lr``).
    The relative residual of a step is ``‖s_{t+1} − s_t‖ / ‖s_t‖``; with ``tol=0`` every sample
    takes ``max_steps`` steps, a fixed budget as in the energy-based LCP set-ups.

    Args:
        lr: Adam's learning rate. beta1, beta2: its moment decay rates. eps: its denominator floor.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        _number("lr", self.lr)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        _number("eps", self.eps, strict=False)

    def init(self, fn, z, context):
        return torch.zeros_like(z), torch.zeros_like(z)

    def step(self, fn, z, context, carry, t, groups):
        m, v = carry
        grad = fn(z, context).neg_()
        # torch.optim.Adam's single-tensor update, operation by operation.
        m = m.lerp(grad, 1 - self.beta1)
        v = v.mul(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1 ** float(t))
        denom = (v.sqrt() / (1 - self.beta2 ** float(t)) ** 0.5).add_(self.eps)
        z_next = z.addcdiv(m, denom, value=-step_size)
        return z_next, relative_residual(z_next - z, z, groups), (m, v)
