"""What a solve returns: the state, and per sample how it ended (a status code) and at what cost."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from ..errors import SolverDivergedError


class Status(enum.IntEnum):
    """How a sample's solve ended.

    ``CONVERGED``: its relative residual fell below ``tol``. ``STALLED``: the stall rule stopped it
    (its residual stopped falling, see :class:`~leastcontrol.solvers.Solver`'s ``patience``).
    ``MAX_STEPS``: it was still running at ``max_steps``. ``DIVERGED``: its state became NaN/Inf.
    """

    CONVERGED = 0
    STALLED = 1
    MAX_STEPS = 2
    DIVERGED = 3


@dataclass
class SolveStats:
    """What a solve did, per sample and in total.

    Attributes:
        steps: steps the solve ran (those of its longest-running sample).
        status: ``(B,)`` int64 :class:`Status` codes.
        sample_steps: ``(B,)`` int64, the steps each sample took before it stopped.
        sample_residual: ``(B,)`` float64, each sample's relative residual where it stopped.
        trace: the largest residual over the running samples at every convergence check.
        counters: the step rule's own totals (e.g. Anderson's ``fallbacks`` and ``restarts``).
        sample_radius: ``(B,)`` with ``check_stability``: each sample's Euler-map spectral radius at
            the returned state (:func:`~leastcontrol.solvers.euler_map_radius`).
        diverged: for the first sample that diverged, ``(population, step)``; else ``None``.
    """

    steps: int
    status: torch.Tensor
    sample_steps: torch.Tensor
    sample_residual: torch.Tensor
    trace: List[float] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    sample_radius: torch.Tensor | None = None
    diverged: tuple | None = None

    def fraction(self, status: Status) -> float:
        """Fraction of the samples that ended with ``status``."""
        return float((self.status == int(status)).double().mean())

    @property
    def converged(self) -> bool:
        """Every sample converged."""
        return bool((self.status == int(Status.CONVERGED)).all())

    @property
    def converged_fraction(self) -> float:
        return self.fraction(Status.CONVERGED)

    @property
    def stalled_fraction(self) -> float:
        return self.fraction(Status.STALLED)

    @property
    def residual(self) -> float:
        """The largest final residual over the samples."""
        return float(self.sample_residual.max())

    @property
    def mean_sample_steps(self) -> float:
        return float(self.sample_steps.double().mean())

    @property
    def unstable_fraction(self) -> float | None:
        """With ``check_stability``: the fraction of samples settled where the plain dynamics leave."""
        from .stability import UNSTABLE_RADIUS
        if self.sample_radius is None:
            return None
        return float((self.sample_radius > UNSTABLE_RADIUS).double().mean())

    def summary(self) -> Dict[str, object]:
        """JSON-ready totals: steps, mean steps per sample, largest residual, fraction per status."""
        return {"steps": self.steps, "mean_sample_steps": self.mean_sample_steps, "residual": self.residual,
                **{f"{s.name.lower()}_fraction": self.fraction(s) for s in Status}}


@dataclass
class SolveResult:
    """The final state (same structure as the start) and :class:`SolveStats`."""

    state: object
    stats: SolveStats

    def raise_if_diverged(self, solver: str = "solver", hint: str | None = None) -> "SolveResult":
        """Raise :class:`~leastcontrol.errors.SolverDivergedError` naming the population if a sample diverged."""
        if self.stats.diverged is not None:
            population, step = self.stats.diverged
            raise SolverDivergedError(population, step, solver, hint)
        return self
