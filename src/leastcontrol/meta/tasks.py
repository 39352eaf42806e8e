"""Few-shot task distributions: each ``sample`` returns a :class:`TaskBatch` of T tasks.

``sample(n_tasks, generator, queries=None, split="train")``: ``split="test"`` draws
held-out tasks (Omniglot: characters never seen in meta-training; sinusoid: the
same distribution, drawn from a separate generator by the caller).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..data.omniglot import DRAWINGS_PER_CHARACTER, CharacterSet, load_protocol
from ..errors import ConfigError
from .learners import ConvLearner, check_activation, mlp_learner
from .methods import TaskBatch


def check_episode(shots: int, queries: int, flag: str = "queries") -> None:
    """An Omniglot episode draws ``shots + queries`` distinct drawings of a character; there are 20.

    Raises:
        ConfigError: naming the flag to lower.
    """
    if shots + queries > DRAWINGS_PER_CHARACTER:
        raise ConfigError(f"shots + {flag} = {shots + queries} but Omniglot has only {DRAWINGS_PER_CHARACTER} "
                          f"drawings per character; lower --shots or --{flag.replace('_', '-')}")


def _seed_global(generator: torch.Generator | None) -> None:
    """Seed the global RNG (which layer initialisations use) from ``generator``."""
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))


def _check_positive(obj, keys):
    for key in keys:
        value = getattr(obj, key)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")


@dataclass
class Sinusoid:
    """Sinusoid regression: ``y = A sin(x − φ)``, A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5].

    Args:
        shots: K support points per task. queries: query points per task (validation loss).
        activation: the learner's rate function: ``relu`` (published), ``softplus`` or ``tanh`` (smooth).
    """

    shots: int = 10
    queries: int = 10
    activation: str = "relu"
    loss = "mean_squared_error"

    def __post_init__(self):
        _check_positive(self, ("shots", "queries"))
        check_activation(self.activation)

    def sample(self, n_tasks: int, generator: torch.Generator, queries: int | None = None,
               split: str = "train") -> TaskBatch:
        q = queries or self.queries
        amp = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
        phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
        x = torch.empty(n_tasks, self.shots + q, 1).uniform_(-5.0, 5.0, generator=generator)
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:])

    def model(self, generator: torch.Generator | None = None) -> nn.Module:
        """The standard learner: MLP 1-40-40-1 (ReLU unless ``activation`` says otherwise)."""
        _seed_global(generator)
        return mlp_learner(1, 1, hidden=(40, 40), activation=self.activation)


@dataclass
class Omniglot:
    """N-way K-shot Omniglot episodes (Lake et al., 2015; Finn et al., 2017).

    Meta-training classes are the training characters, each also rotated by
    90°, 180° and 270° (a rotated character is a new class); meta-test classes
    are the test split's characters, unrotated. An episode draws ``ways``
    classes in random order — the order is the label, so labels are permuted
    per episode — and ``shots + queries`` distinct drawings of each.

    Args:
        ways, shots, queries: episode shape (``shots + queries ≤ 20``).
        learner: ``conv`` (4 × [conv 3×3, batch norm, ReLU, max-pool], 64 channels) or ``mlp`` (faster).
        activation: the learner's rate function: ``relu`` (published), ``softplus`` or ``tanh`` (smooth).
        protocol: ``small`` (train small1, test small2's new alphabets) or ``standard``.
        data_dir: directory holding the zip archives.
        channels: conv width (64).
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    learner: str = "conv"
    activation: str = "relu"
    protocol: str = "small"
    data_dir: Optional[str] = None
    channels: int = 64
    loss = "cross_entropy"
    splits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _check_positive(self, ("ways", "shots", "queries", "channels"))
        if self.learner not in ("conv", "mlp"):
            raise ConfigError(f"unknown Omniglot learner '{self.learner}'; valid: conv, mlp")
        check_activation(self.activation)
        check_episode(self.shots, self.queries)
        if not self.splits:
            train, test = load_protocol(self.protocol, self.data_dir)
            self.splits.update(train=train, test=test)
        for split, rotations in (("train", 4), ("test", 1)):
            available = len(self.splits[split].characters) * rotations
            if self.ways > available:
                raise ConfigError(f"{self.ways}-way episodes need {self.ways} classes but the {split} split has "
                                  f"{available}; lower --ways")

    def sample(self, n_tasks: int, generator: torch.Generator, queries: int | None = None,
               split: str = "train") -> TaskBatch:
        """``n_tasks`` episodes: x ``(T, ways·shots, 1, 28, 28)`` (flattened for the MLP), y ``(T, ways·shots)``."""
        q = queries or self.queries
        check_episode(self.shots, q)
        chars: CharacterSet = self.splits[split]
        rotations = 4 if split == "train" else 1
        n_classes = len(chars.characters) * rotations
        W, S = self.ways, self.shots + q
        classes = torch.stack([torch.randperm(n_classes, generator=generator)[:W] for _ in range(n_tasks)])
        drawings = torch.rand(n_tasks, W, DRAWINGS_PER_CHARACTER, generator=generator).argsort(-1)[..., :S]
        images = chars.images[(classes // rotations)[..., None], drawings]  # (T, W, S, H, W)
        turns = classes % rotations
        for k in range(1, rotations):
            mask = turns == k
            images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        x = images.unsqueeze(3)  # (T, W, S, 1, H, W)
        if self.learner == "mlp":
            x = x.flatten(3)
        labels = torch.arange(W).view(1, W, 1).expand(n_tasks, W, S)
        support = (slice(None), slice(None), slice(0, self.shots))
        query = (slice(None), slice(None), slice(self.shots, S))
        return TaskBatch(x[support].flatten(1, 2), labels[support].flatten(1, 2),
                         x[query].flatten(1, 2), labels[query].flatten(1, 2), classes)

    def model(self, generator: torch.Generator | None = None) -> nn.Module:
        _seed_global(generator)
        size = self.splits["train"].images.shape[-1]
        if self.learner == "mlp":
            return mlp_learner(self.ways, size * size, activation=self.activation)
        return ConvLearner(self.ways, 1, size, self.channels, activation=self.activation)
