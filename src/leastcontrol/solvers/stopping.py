"""The stopping rule, and the per-sample record of a solve that applies it.

This is the one place where a sample is declared done. At every convergence check a running sample
stops if its residual is not finite (``DIVERGED``), below ``tol`` (``CONVERGED``) or the stall rule
stops it (``STALLED``); one still running at ``max_steps`` ends ``MAX_STEPS``
(:class:`~leastcontrol.solvers.Status`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ..errors import SolverDivergedError
from .field import Field
from .result import SolveStats, Status

# The stall rule: a sample stalls when its residual has not fallen below this fraction of its
# last mark in `patience` steps (chatter at a floor moves it by a few per cent).
STALL_RATIO = 0.9


@dataclass(frozen=True)
class StoppingRule:
    """When a sample is done.

    Args:
        tol: a sample converges when its relative residual is below this.
        patience: the stall rule (``None``: off). A sample whose residual has not fallen below
            ``STALL_RATIO`` (0.9) times its last mark for ``patience`` steps stops there.
        stall_tol: a sample stalls only while its residual is below this.
    """

    tol: float
    patience: int | None = None
    stall_tol: float = math.inf

    def done(self, res: torch.Tensor, step: int, mark_res: torch.Tensor, mark_step: torch.Tensor):
        """``(done, mark_res, mark_step)`` of rows with residuals ``res`` (float64) at ``step``: ``done``
        where a row converged, stalled or diverged; the stall rule's marks updated."""
        done = (res < self.tol) | ~torch.isfinite(res)
        if self.patience:
            fell = res < STALL_RATIO * mark_res
            mark_res = torch.where(fell, res, mark_res)
            mark_step = torch.where(fell, step, mark_step)
            done |= self._stalled(res, step, mark_step)
        return done, mark_res, mark_step

    def _stalled(self, res: torch.Tensor, step: int, mark_step: torch.Tensor) -> torch.Tensor:
        stalled = step - mark_step >= self.patience
        return stalled & (res < self.stall_tol) if self.stall_tol < math.inf else stalled

    def status(self, res: torch.Tensor, step: int, mark_step: torch.Tensor) -> torch.Tensor:
        """The :class:`Status` of rows that stopped at ``step`` with residuals ``res`` (``MAX_STEPS`` for
        a row that did not): diverged before converged before stalled."""
        status = torch.full(res.shape, int(Status.MAX_STEPS), dtype=torch.int64, device=res.device)
        if self.patience:
            status = torch.where(self._stalled(res, step, mark_step), int(Status.STALLED), status)
        status = torch.where(res < self.tol, int(Status.CONVERGED), status)
        return torch.where(torch.isfinite(res), status, int(Status.DIVERGED))


class Tracker:
    """Which samples of a solve still run, and the outcome of those that stopped.

    With ``freeze`` a sample that stops leaves the batch: its final state is stored here and the
    driver goes on with the rows ``keep`` that :meth:`check` returns, so a few slow samples do not
    make the whole batch pay. Without it every row runs until all are done at one check.
    """

    def __init__(self, z0: torch.Tensor, freeze: bool, rule: StoppingRule):
        B, device = z0.shape[0], z0.device
        self.freeze, self.rule = freeze, rule
        f64 = dict(dtype=torch.float64, device=device)
        self.out = z0.clone() if freeze else None
        self.active = torch.arange(B, device=device)
        self.status = torch.full((B,), int(Status.MAX_STEPS), dtype=torch.int64, device=device)
        self.sample_steps = torch.zeros(B, dtype=torch.int64, device=device)
        self.sample_residual = torch.full((B,), math.inf, **f64)
        # Of the running rows: the stall rule's marks, and their residuals at the last check (and its step).
        self.mark_res = torch.full((B,), math.inf, **f64)
        self.mark_step = torch.zeros(B, **f64)
        self.last = (self.sample_residual.clone(), 0)
        self.diverged: Tuple[str, int] | None = None

    def check(self, res: torch.Tensor, step: int, outcome: torch.Tensor, current, field: Field,
              throw: bool, solver: str):
        """Apply the stopping rule to the running rows' residuals ``res`` at ``step``.

        ``outcome``: the state each row keeps if it stops now; ``current()``: where to look for the
        population that blew up in a row that diverged. Returns ``(finished, keep)``: ``finished`` when every row is done;
        ``keep`` the indices of the rows that go on when some stopped and freezing is on, else None.

        Raises:
            SolverDivergedError: a row diverged and ``throw``.
        """
        res = res.double()
        done, self.mark_res, self.mark_step = self.rule.done(res, step, self.mark_res, self.mark_step)
        self.last = (res, step)
        stop = done.nonzero().squeeze(1)   # one read of the mask answers "all?", "any?" and "which?"
        if stop.numel() == 0:
            return False, None
        status = self.rule.status(res[stop], step, self.mark_step[stop])
        if self.diverged is None:
            bad = (status == int(Status.DIVERGED)).nonzero()
            if bad.numel():
                row = stop[bad[0, 0]]
                self.diverged = (field.culprit(current()[row:row + 1]), step)
                if throw:
                    raise SolverDivergedError(self.diverged[0], step, solver)
        if stop.numel() == done.numel():
            return True, None
        if not self.freeze:
            return False, None
        keep = (~done).nonzero().squeeze(1)
        rows = self.active[stop]
        self.out[rows] = outcome[stop]
        self._record(rows, status, res[stop], step)
        self.active = self.active[keep]
        self.mark_res, self.mark_step = self.mark_res[keep], self.mark_step[keep]
        self.last = (res[keep], step)
        return False, keep

    def _record(self, rows, status, res, step: int) -> None:
        self.status[rows] = status
        self.sample_residual[rows] = res
        self.sample_steps[rows] = step

    def finish(self, outcome: torch.Tensor) -> torch.Tensor:
        """The final flat state of every sample; the running rows end at ``outcome``."""
        res, step = self.last
        self._record(self.active, self.rule.status(res, step, self.mark_step), res, step)
        if not self.freeze:
            return outcome
        self.out[self.active] = outcome
        return self.out

    def stats(self, steps: int, trace: List[float], counters: Dict[str, int]) -> SolveStats:
        return SolveStats(steps, self.status.cpu(), self.sample_steps.cpu(), self.sample_residual.cpu(), trace,
                          counters, diverged=self.diverged)
