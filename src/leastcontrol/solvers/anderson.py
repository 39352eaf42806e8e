"""Anderson acceleration of the fixed-point map ``T(s) = s + dt·g(s)``, batched."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import ConfigError
from .base import BestIterateSolver, _number, _positive_int, hold_first_nonfinite, register_solver
from .field import relative_residual
from .mixing import anderson_weights


class _Memory(NamedTuple):
    X: torch.Tensor        # (B, m, N) past iterates
    G: torch.Tensor        # (B, m, N) float64: their steps dt·g
    gram: torch.Tensor     # (B, m, m) float64: G_i · G_j (each sample's groups weighed by 1/‖s_g‖)
    valid: torch.Tensor    # (B, m) bool
    best_z: torch.Tensor   # (B, N) the iterate with the smallest residual so far
    best_r: torch.Tensor   # (B,) float64: that residual
    fallbacks: torch.Tensor   # () int64: steps where a sample's least squares failed (plain step taken)
    restarts: torch.Tensor    # () int64: returns to the best iterate
    probe: torch.Tensor    # (B, N): where a sample's residual first was not finite
    seen: torch.Tensor     # (B,) bool: it was


def _group_weights(z: torch.Tensor, groups) -> torch.Tensor:
    """``(B, N)`` float64: ``1/‖z_g‖`` of each column's group, the norm the per-group residual reads."""
    norms = torch.stack([p.pow(2).sum(1) for p in z.split(list(groups), 1)], 1).double()
    group_of = torch.repeat_interleave(torch.arange(len(groups), device=z.device), torch.tensor(groups, device=z.device))
    return norms.clamp_min(1e-30).rsqrt()[:, group_of]


@register_solver("anderson")
@dataclass(repr=False)
class Anderson(BestIterateSolver):
    """Anderson acceleration: each step mixes the last ``memory`` iterates with the weights that
    minimise the norm of the combined residual (sum-to-one constraint, Tikhonov regularisation
    ``reg`` relative to the Gram matrix's scale, solved in float64). With ``groups`` that norm weighs
    each group by ``1/‖s_g‖``, the norm the stopping rule reads. A sample whose small system is
    singular takes a plain step (``counters["fallbacks"]``); a sample whose residual grows above
    ``restart`` times its best returns to its best iterate with an empty memory
    (``counters["restarts"]``). Each sample returns its best iterate.

    ``warmup`` plain Euler steps come first (residuals only at the checks), so the many samples that
    settle quickly pay Euler's price and only the slow ones are accelerated.

    Args:
        memory: past iterates mixed (m). mixing: damping β of the update ``Σ α_j (s_j + β·dt·g_j)``.
        reg: regularisation of the least squares. restart: residual growth that triggers a restart.
        start_below: a sample accelerates only while its residual is below this (far from a fixed
            point the plain dynamics choose the basin); ``inf``: always.
        warmup: plain Euler steps before the acceleration starts.
    """

    memory: int = 5
    mixing: float = 1.0
    reg: float = 1e-8
    restart: float = 10.0
    start_below: float = 1e-2
    warmup: int = 0

    def __post_init__(self):
        super().__post_init__()
        _positive_int("memory", self.memory)
        if not (isinstance(self.mixing, (int, float)) and 0 < self.mixing <= 1):
            raise ConfigError(f"mixing must be in (0, 1], got {self.mixing!r}")
        _number("restart", self.restart, low=1.0)
        if not (isinstance(self.start_below, (int, float)) and self.start_below > 0):
            raise ConfigError(f"start_below must be > 0, got {self.start_below!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")

    def init(self, fn, z, context):
        B, N, m = z.shape[0], z.shape[1], self.memory
        zero = torch.zeros((), dtype=torch.int64, device=z.device)
        return _Memory(z.new_zeros(B, m, N), z.new_zeros(B, m, N, dtype=torch.float64),
                       z.new_zeros(B, m, m, dtype=torch.float64), torch.zeros(B, m, dtype=torch.bool, device=z.device),
                       z.clone(), z.new_full((B,), math.inf, dtype=torch.float64), zero, zero.clone(),
                       torch.zeros_like(z), torch.zeros(B, dtype=torch.bool, device=z.device))

    def advance(self, fn, z, context, carry, n, step, groups, run):
        X, G, gram, valid, best_z, best_r, fallbacks, restarts, probe, seen = carry
        res = None
        for t in range(step + 1, step + n + 1):
            gz = self.dt * fn(z, context)
            warming = t <= self.warmup
            # Warm-up steps are plain Euler, as cheap as Euler's own: residuals only at the check.
            if not warming or t == step + n:
                res = relative_residual(gz, z, groups).double()
                improved = res < best_r
                best_r = torch.where(improved, res, best_r)
                best_z = torch.where(improved[:, None], z, best_z)
                probe, seen = hold_first_nonfinite(res, z + gz, probe, seen)
            if warming:
                z = z + gz
                continue
            slot = (t - 1) % self.memory
            X[:, slot], G[:, slot] = z, gz
            if groups is None:
                row = torch.bmm(G, G[:, slot, :, None]).squeeze(-1)
                gram[:, slot, :], gram[:, :, slot] = row, row
            else:
                Gw = G * _group_weights(z, groups)[:, None, :]
                gram = torch.bmm(Gw, Gw.transpose(1, 2))
            valid[:, slot] = True
            alpha, ok = anderson_weights(gram, valid, self.reg)
            mixed = (torch.bmm(alpha[:, None, :].to(z.dtype), X)
                     + self.mixing * torch.bmm(alpha[:, None, :], G).to(z.dtype)).squeeze(1)
            z = torch.where(ok[:, None], mixed, z + self.mixing * gz)
            fallbacks = fallbacks + (~ok).sum()
            # Safeguard: a sample whose residual grew far above its best restarts from its best iterate.
            blown = res > self.restart * best_r
            restarts = restarts + blown.sum()
            z = torch.where(blown[:, None], best_z, z)
            # Far from a fixed point the plain dynamics choose the basin; acceleration starts near it.
            valid = valid & ~(blown | (res > self.start_below))[:, None]
        return z, self.checked(res, best_r), _Memory(X, G, gram, valid, best_z, best_r, fallbacks, restarts, probe, seen)
