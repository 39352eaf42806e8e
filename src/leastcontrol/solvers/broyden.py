"""Limited-memory ("good") Broyden's method for the root of ``dt·g(s)``, batched."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import BestIterateSolver, _number, _positive_int, hold_first_nonfinite, register_solver
from .field import relative_residual


class _Memory(NamedTuple):
    U: torch.Tensor        # (B, m, N) and V (B, m, N): J⁻¹ ≈ −I + Σ u_i v_iᵀ
    V: torch.Tensor
    used: torch.Tensor     # (B,) int64: pairs in use
    gz: torch.Tensor       # (B, N): dt·g at the current iterate
    best_z: torch.Tensor   # (B, N)
    best_r: torch.Tensor   # (B,) float64
    fallbacks: torch.Tensor   # () int64: degenerate secant updates skipped
    restarts: torch.Tensor    # () int64: returns to the best iterate
    probe: torch.Tensor    # (B, N): where a sample's residual first was not finite
    seen: torch.Tensor     # (B,) bool: it was


def _apply(U, V, n, x):
    """``J⁻¹ x = −x + Σ_{i<n} u_i (v_iᵀ x)`` per sample; ``_apply(V, U, n, x)`` is ``J⁻ᵀ x``."""
    used = (torch.arange(U.shape[1], device=U.device)[None, :] < n[:, None]).to(x.dtype)
    return -x + torch.einsum("bm,bmn->bn", used * torch.einsum("bmn,bn->bm", V, x), U)


@register_solver("broyden")
@dataclass(repr=False)
class Broyden(BestIterateSolver):
    """Limited-memory ("good") Broyden's method: a per-sample low-rank inverse Jacobian
    ``J⁻¹ ≈ −I + Σ_i u_i v_iᵀ`` (from ``−I``, the Jacobian of ``T(s) − s`` for a weakly coupled map),
    steps ``s ← s − J⁻¹ g(s)`` and secant updates; a full memory of ``memory`` pairs restarts from
    ``−I``. A degenerate secant update is skipped (``counters["fallbacks"]``); a sample whose residual
    grows above ``restart`` times its best returns to its best iterate with an empty memory
    (``counters["restarts"]``). Each sample returns its best iterate.

    >>> import torch
    >>> res = Broyden(tol=1e-10, max_steps=50, check_every=1).solve(
    ...     lambda s: {"x": 0.5 * torch.cos(s["x"]) - s["x"]}, {"x": torch.zeros(3, 2)})
    >>> res.stats.converged, res.stats.steps < 20
    (True, True)
    """

    memory: int = 20
    restart: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        _positive_int("memory", self.memory)
        _number("restart", self.restart, low=1.0)

    def init(self, fn, z, context):
        B, N = z.shape
        zero = torch.zeros((), dtype=torch.int64, device=z.device)
        return _Memory(z.new_zeros(B, self.memory, N), z.new_zeros(B, self.memory, N),
                       torch.zeros(B, dtype=torch.long, device=z.device), self.dt * fn(z, context), z.clone(),
                       z.new_full((B,), math.inf, dtype=torch.float64), zero, zero.clone(),
                       torch.zeros_like(z), torch.zeros(B, dtype=torch.bool, device=z.device))

    def advance(self, fn, z, context, carry, n, step, groups, run):
        U, V, used, gz, best_z, best_r, fallbacks, restarts, probe, seen = carry
        res = None
        for _ in range(n):
            res = relative_residual(gz, z, groups).double()
            improved = res < best_r
            best_r = torch.where(improved, res, best_r)
            best_z = torch.where(improved[:, None], z, best_z)
            probe, seen = hold_first_nonfinite(res, z + gz, probe, seen)
            # Safeguard: a sample far above its best restarts there with an empty memory.
            blown = res > self.restart * best_r
            restarts = restarts + blown.sum()
            if bool(blown.any()):
                z = torch.where(blown[:, None], best_z, z)
                used = torch.where(blown, 0, used)
                gz = self.dt * fn(z, context)
            dz = -_apply(U, V, used, gz)
            z_new = z + dz
            g_new = self.dt * fn(z_new, context)
            dg = g_new - gz
            jdg = _apply(U, V, used, dg)
            v = _apply(V, U, used, dz)
            den = (dz * jdg).sum(1, keepdim=True)
            ok = den.abs().squeeze(1) > 1e-12 * (dz.norm(dim=1) * jdg.norm(dim=1)).clamp_min(1e-30)
            fallbacks = fallbacks + (~ok).sum()
            used = torch.where(used >= self.memory, 0, used)  # full memory: restart from −I
            u = (dz - jdg) / torch.where(ok[:, None], den, torch.ones_like(den))
            slot = used.clamp_max(self.memory - 1)
            rows = torch.arange(z.shape[0], device=z.device)
            U[rows, slot] = torch.where(ok[:, None], u, U[rows, slot])
            V[rows, slot] = torch.where(ok[:, None], v, V[rows, slot])
            used = used + ok.long()
            z, gz = z_new, g_new
        return z, self.checked(res, best_r), _Memory(U, V, used, gz, best_z, best_r, fallbacks, restarts, probe, seen)
