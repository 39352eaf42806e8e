"""Exceptions raised by leastcontrol.

Every failure a user can cause has its own type and a message that names the
fix, so a long run never fails with a bare traceback from deep inside torch.
"""
from __future__ import annotations


class LeastControlError(Exception):
    """Base class of every error raised by the library."""


class SolverDivergedError(LeastControlError, FloatingPointError):
    """A fixed-point solve produced NaN or Inf.

    Attributes:
        population: name of the first state population that became non-finite.
        step: solver iteration at which it was detected.
        solver: what diverged (a solver's name, with any context).
        hint: the fix the message names.
    """

    GENERIC_HINT = "Try a smaller dt, a smaller learning rate, or gradient clipping (--grad-clip)."

    def __init__(self, population: str, step: int, solver: str = "solver", hint: str | None = None):
        self.population = population
        self.step = step
        self.solver = solver
        self.hint = hint or self.GENERIC_HINT
        super().__init__(f"{solver} diverged: population '{population}' became NaN/Inf at step {step}. {self.hint}")


class DatasetNotFoundError(LeastControlError, FileNotFoundError):
    """A data set is not on disk and could not be downloaded."""


class DataFormatError(LeastControlError, ValueError):
    """A data file exists but is corrupt or not in the expected format."""


class ConfigError(LeastControlError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(LeastControlError, ValueError):
    """A checkpoint file is missing, corrupt or belongs to another run."""


class UnstableEquilibriumWarning(UserWarning):
    """A solve settled samples at fixed points that the plain dynamics move away from.

    The state is a root of the field, but not where the system, left to its own dynamics,
    would settle; an Euler phase started there (an adjoint or a controlled phase) grows.
    """
