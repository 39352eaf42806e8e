"""The stopping rule, and the per-sample record of a solve that applies it.

This is the one place where a sample is declared done. At every convergence check each running
sample gets a :class:`~leastcontrol.solvers.Status`: ``DIVERGED`` if its residual is not finite,
``CONVERGED`` if it is below ``tol``, ``STALLED`` if the stall rule stops it, else it runs on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ..errors import SolverDivergedError
from .field import Field
from .result import SolveStats, Status

RUNNING = -1
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

    def decide(self, res: torch.Tensor, step: int, mark_res: torch.Tensor, mark_step: torch.Tensor):
        """``(status, mark_res, mark_step)`` of rows with residuals ``res`` (float64) at ``step``;
        ``status`` is a :class:`Status` code, or ``RUNNING``."""
        status = torch.where(torch.isfinite(res), RUNNING, int(Status.DIVERGED))
        if self.patience:
            fell = res < STALL_RATIO * mark_res
            mark_res = torch.where(fell, res, mark_res)
            mark_step = torch.where(fell, step, mark_step)
            stalled = step - mark_step >= self.patience
            if self.stall_tol < math.inf:
                stalled &= res < self.stall_tol
            status = torch.where(stalled & (status == RUNNING), int(Status.STALLED), status)
        status = torch.where(res < self.tol, int(Status.CONVERGED), status)
        return status, mark_res, mark_step


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
        # Of the running rows: the stall rule's marks, and the outcome of the last check.
        self.mark_res = torch.full((B,), math.inf, **f64)
        self.mark_step = torch.zeros(B, **f64)
        self.last = (torch.full((B,), RUNNING, dtype=torch.int64, device=device), self.sample_residual.clone(), 0)
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
        status, self.mark_res, self.mark_step = self.rule.decide(res, step, self.mark_res, self.mark_step)
        done = status != RUNNING
        self.last = (status, res, step)
        stop = done.nonzero().squeeze(1)   # one read of the mask answers "all?", "any?" and "which?"
        if stop.numel() and self.diverged is None:
            bad = (status[stop] == int(Status.DIVERGED)).nonzero()
            if bad.numel():
                row = stop[bad[0, 0]]
                self.diverged = (field.culprit(current()[row:row + 1]), step)
                if throw:
                    raise SolverDivergedError(self.diverged[0], step, solver)
        if stop.numel() == done.numel():
            return True, None
        if not self.freeze or stop.numel() == 0:
            return False, None
        keep = (~done).nonzero().squeeze(1)
        rows = self.active[stop]
        self.out[rows] = outcome[stop]
        self._record(rows, status[stop], res[stop], step)
        self.active = self.active[keep]
        self.mark_res, self.mark_step = self.mark_res[keep], self.mark_step[keep]
        self.last = (status[keep], res[keep], step)
        return False, keep

    def _record(self, rows, status, res, step: int) -> None:
        self.status[rows] = torch.where(status == RUNNING, int(Status.MAX_STEPS), status)
        self.sample_residual[rows] = res
        self.sample_steps[rows] = step

    def finish(self, outcome: torch.Tensor) -> torch.Tensor:
        """The final flat state of every sample; the running rows end at ``outcome``."""
        status, res, step = self.last
        self._record(self.active, status, res, step)
        if not self.freeze:
            return outcome
        self.out[self.active] = outcome
        return self.out

    def stats(self, steps: int, trace: List[float], counters: Dict[str, int]) -> SolveStats:
        return SolveStats(steps, self.status.cpu(), self.sample_steps.cpu(), self.sample_residual.cpu(), trace,
                          counters, diverged=self.diverged)
