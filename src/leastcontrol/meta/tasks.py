"""Few-shot task distributions: each ``sample`` returns a :class:`TaskBatch` of T tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .methods import TaskBatch


@dataclass
class Sinusoid:
    """Sinusoid regression: ``y = A sin(x − φ)``, A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5].

    Args:
        shots: K support points per task. queries: query points per task (validation loss).
    """

    shots: int = 10
    queries: int = 10
    loss = "mse"

    def __post_init__(self):
        for key in ("shots", "queries"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")

    def sample(self, n_tasks: int, generator: torch.Generator, queries: int | None = None) -> TaskBatch:
        q = queries or self.queries
        amp = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
        phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
        x = torch.empty(n_tasks, self.shots + q, 1).uniform_(-5.0, 5.0, generator=generator)
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:])

    @staticmethod
    def model(generator: torch.Generator | None = None) -> nn.Module:
        """The standard learner: MLP 1-40-40-1 with ReLU."""
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
