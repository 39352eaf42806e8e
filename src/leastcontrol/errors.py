"""Exceptions raised by leastcontrol.

Every failure a user can cause has its own type and a message that names the
fix, so a long run never fails with a bare traceback from deep inside torch.
"""
from __future__ import annotations

from typing import Any


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

    GENERIC_HINT = "Try a smaller dt, a smaller learning rate (--lr), or gradient clipping (loop.grad_clip)."

    def __init__(self, population: str, step: int, solver: str = "solver", hint: str | None = None):
        self.population = population
        self.step = step
        self.solver = solver
        self.hint = hint or self.GENERIC_HINT
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.solver} diverged: population '{self.population}' became NaN/Inf at step {self.step}. {self.hint}"

    def in_context(self, where: str, hint: str = "") -> "SolverDivergedError":
        """The same error with ``where`` (``epoch 3, batch 7``) before the solver's name and ``hint`` added."""
        return type(self)(self.population, self.step, f"{where}: {self.solver}", f"{self.hint} {hint}".strip())


class NonFiniteUpdateError(SolverDivergedError):
    """A method's update (a parameter's gradient) came out NaN or Inf: it is never written to ``.grad``.

    Attributes:
        population: the parameter's name. step: ``None``. solver: the method's name.
    """

    GENERIC_HINT = ("Check the inputs' scale (normalise them) and the learning rate; clip gradients "
                    "(loop.grad_clip) or lower the method's step sizes.")

    def _message(self) -> str:
        return f"{self.solver}: the update of '{self.population}' is NaN/Inf. {self.hint}"


class DatasetNotFoundError(LeastControlError, FileNotFoundError):
    """A data set is not on disk and could not be downloaded."""


class DataFormatError(LeastControlError, ValueError):
    """A data file exists but is corrupt or not in the expected format."""


class ConfigError(LeastControlError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(LeastControlError, ValueError):
    """A checkpoint file is missing, corrupt or belongs to another run."""


class OutputError(LeastControlError, OSError):
    """An output (result JSON, checkpoint, report) cannot be written where the user asked."""


class ResultNotWrittenError(OutputError):
    """A run finished but its result could not be written; the result is in ``result``."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


class UnstableEquilibriumWarning(UserWarning):
    """A solve settled samples at fixed points that the plain dynamics move away from.

    The state is a root of the field, but not where the system, left to its own dynamics,
    would settle; an Euler phase started there (an adjoint or a controlled phase) grows.
    """
