"""Anderson mixing: the least-squares weights, and the driver's check-level mix of runs of steps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Tuple

import torch

from ..errors import ConfigError
from .field import _TINY

_UNLIMITED = 2 ** 62   # returns to the best point: more than any solve has checks


def anderson_weights(gram: torch.Tensor, valid: torch.Tensor, reg: float):
    """Mixing weights α ``(B, m)`` minimising ‖Σ α_j G_j‖ with Σ α_j = 1 over the valid slots.

    ``gram`` ``(B, m, m)`` float64 holds the inner products ``G_i · G_j`` of the stored residuals;
    ``reg`` is Tikhonov regularisation relative to the Gram matrix's scale. Returns ``(α, ok)``,
    ``ok`` False for a sample whose small system is singular (its α is zero). No in-place writes,
    so that it also runs inside a compiled graph.
    """
    pair = valid[:, :, None] & valid[:, None, :]
    gram = torch.where(pair, gram, 0.0)
    scale = (gram.diagonal(dim1=1, dim2=2).sum(1) / valid.sum(1).clamp_min(1)).clamp_min(_TINY)
    # Invalid slots get an identity row and a zero right-hand side, so their weight is exactly 0.
    gram = gram + torch.diag_embed(torch.where(valid, (reg * scale)[:, None], 1.0))
    w, info = torch.linalg.solve_ex(gram, valid.to(gram.dtype)[:, :, None])
    w = w.squeeze(-1)
    wsum = w.sum(1)
    alpha = w / wsum[:, None]
    ok = (info == 0) & (wsum.abs() > _TINY) & torch.isfinite(alpha).all(1)
    return torch.where(ok[:, None], alpha, 0.0), ok


@dataclass
class CheckMix:
    """Anderson acceleration of the map "``check_every`` steps", one mix at each convergence check.

    From step ``after`` on, each check mixes the end points of the last ``memory`` runs of steps
    between two checks (:func:`check_mix`): the steps stay the rule's own, the fixed point and the
    stopping rule are unchanged, only the path there. A sample whose residual at a check exceeds
    ``restart`` times its best returns to its best point with an empty memory, ``restarts`` times
    (``None``: no limit); the next such jump stops its mixing and it goes on with plain steps.
    ``reg``: Tikhonov regularisation of the least squares, relative to their scale.
    """

    memory: int = 3
    after: int = 50
    restarts: int | None = None
    restart: float = 10.0
    reg: float = 1e-8

    def __post_init__(self):
        if not (isinstance(self.memory, int) and not isinstance(self.memory, bool) and self.memory >= 1):
            raise ConfigError(f"mix.memory must be a positive integer, got {self.memory!r}")
        if not (isinstance(self.after, int) and self.after >= 0):
            raise ConfigError(f"mix.after must be an integer >= 0, got {self.after!r}")
        if not (self.restarts is None or (isinstance(self.restarts, int) and self.restarts >= 0)):
            raise ConfigError(f"mix.restarts must be an integer >= 0 or None (no limit), got {self.restarts!r}")
        if not (isinstance(self.restart, (int, float)) and self.restart > 1):
            raise ConfigError(f"mix.restart must be > 1, got {self.restart!r}")
        if not (isinstance(self.reg, (int, float)) and self.reg >= 0):
            raise ConfigError(f"mix.reg must be >= 0, got {self.reg!r}")


class MixMemory(NamedTuple):
    """What the check-level mix keeps per sample, oldest run first (see :func:`check_mix`)."""
    F: torch.Tensor        # (B, m, N): the end points of the last m runs
    G: torch.Tensor        # (B, m, N) float64: their residuals F_j − x_j
    P: torch.Tensor        # (B, groups, m, m) float64: P[g, i, j] = G_{i,g} · G_{j,g}
    valid: torch.Tensor    # (B, m) bool: slots holding a run
    best: torch.Tensor     # (B,) float64: the smallest residual at a check so far
    best_z: torch.Tensor   # (B, N): the end point that had it
    left: torch.Tensor     # (B,) int64: returns to the best point left; −1: mixing stopped for good

    @staticmethod
    def empty(z: torch.Tensor, mix: CheckMix, groups: int) -> "MixMemory":
        """No run stored yet, for the flat states ``z`` ``(B, N)``."""
        B, N = z.shape
        m = mix.memory
        f64 = dict(dtype=torch.float64, device=z.device)
        return MixMemory(F=z.new_zeros(B, m, N), G=torch.zeros(B, m, N, **f64), P=torch.zeros(B, groups, m, m, **f64),
                         valid=torch.zeros(B, m, dtype=torch.bool, device=z.device),
                         best=torch.full((B,), math.inf, **f64), best_z=z.clone(),
                         left=torch.full((B,), _UNLIMITED if mix.restarts is None else mix.restarts,
                                         dtype=torch.int64, device=z.device))

    def subset(self, keep: torch.Tensor) -> "MixMemory":
        return MixMemory(*(t[keep] for t in self))


def group_members(groups: Sequence[int] | None, n: int, device) -> torch.Tensor:
    """``(n, groups)`` float64 one-hot: the group of each of the ``n`` columns (one group without
    ``groups``), so that per-group sums are one product."""
    if groups is None:
        return torch.ones(n, 1, dtype=torch.float64, device=device)
    group_of = torch.repeat_interleave(torch.arange(len(groups), device=device), torch.tensor(groups, device=device))
    return torch.nn.functional.one_hot(group_of, len(groups)).to(torch.float64)


def check_mix(memory: MixMemory, start: torch.Tensor, end: torch.Tensor, res: torch.Tensor,
              member: torch.Tensor, reg: float, restart: float) -> Tuple[torch.Tensor, MixMemory]:
    """Anderson mixing (type II) of the map "``check_every`` steps", one mix per check.

    ``memory`` holds, per sample, the last ``m`` pairs (start ``x_j``, end ``F_j``) of the runs of
    steps between two checks; the run ``start → end`` (flat ``(B, N)``, residual ``res`` at the
    check) joins it. Returns ``(Σ α_j F_j, memory with this run)``, α minimising
    ``‖Σ α_j (F_j − x_j)‖`` with ``Σ α_j = 1``, each group (``member``, ``(N, groups)``) weighed by
    ``1/‖s_g‖``, the norm the stopping rule reads. Over ten steps the slow modes of the Euler map, a
    lightly damped rotation included, are few and well separated, so a small memory captures them;
    the mixing costs a few small products per check, not per step.

    A sample whose residual at a check rises above ``restart`` times its best returns to its best
    end point with an empty memory, as long as it has returns left (``memory.left``); once they are
    spent, the next such rise stops its mixing for the rest of the solve and it goes on with plain
    steps from where it is. Returning is what settles a sample that Euler circles (the mix
    overshoots while its memory is short, then converges). It is also what traps a sample whose
    trajectory passes a saddle on its way to a stable root: the mix steers to the saddle, a root
    Euler leaves, and returning to the best point, next to the saddle, repeats the excursion every
    few checks without end. With no returns, Euler alone takes such a sample on to its stable root.

    The residuals ``G_j = F_j − x_j`` are kept in float64 with their inner products per group. A mix
    adds the new run's row of these and weighs the groups by the current ``1/‖s_g‖²``: a fixed,
    small number of operations whatever the memory and the number of groups. The new run replaces
    the oldest, so every tensor keeps its shape and nothing is written in place: the same code runs
    eagerly and inside a compiled graph.
    """
    res = res.double()
    blown = (res > restart * memory.best) & (memory.left >= 0)
    back = blown & (memory.left > 0)
    left = torch.where(blown, memory.left - 1, memory.left)
    improved = res < memory.best
    best = torch.where(improved, res, memory.best)
    best_z = torch.where(improved[:, None], end, memory.best_z)
    g = (end - start).double()
    F = torch.cat([memory.F[:, 1:], end[:, None]], 1)
    G = torch.cat([memory.G[:, 1:], g[:, None]], 1)
    valid = torch.cat([memory.valid[:, 1:], torch.ones_like(memory.valid[:, :1])], 1)
    B, m, N = F.shape
    # The new run against every stored one, per group: (B, groups, m), the last row and column of P.
    row = ((G * g[:, None, :]).reshape(B * m, N) @ member).reshape(B, m, -1).transpose(1, 2)
    P = torch.cat([torch.cat([memory.P[:, :, 1:, 1:], row[:, :, :-1, None]], 3), row[:, :, None, :]], 2)
    weight = (end * end).double() @ member        # ‖s_g‖² per sample and group
    gram = torch.einsum("bgij,bg->bij", P, weight.clamp_min(_TINY).reciprocal())
    alpha, ok = anderson_weights(gram, valid, reg)
    mixed = torch.where((ok & (left >= 0))[:, None], torch.bmm(alpha[:, None, :].to(end.dtype), F).squeeze(1), end)
    valid = valid & ~blown[:, None] & (left >= 0)[:, None]
    return torch.where(back[:, None], best_z, mixed), MixMemory(F, G, P, valid, best, best_z, left)
