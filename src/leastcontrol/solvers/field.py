"""The vector field a solve settles, on one flat ``(B, N)`` buffer, and the norms its stopping rule reads.

The driver and every step rule work on a flat state: one row per sample, the populations side by
side. :class:`Field` is that field with the names of its segments and, where a backend has its own
implementation of the field's steps (C, see :mod:`leastcontrol.native`), that implementation,
registered explicitly by the code that built the field. :class:`Layout` turns a user's state (a
tensor, a tuple or a dict of batch-first tensors) and field into that form and back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch

from ..errors import ConfigError

FlatFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], torch.Tensor]
_TINY = 1e-30   # floor under ‖s‖² in a relative residual


@dataclass(frozen=True)
class Field:
    """``ż = fn(z, context)`` on a flat ``(B, N)`` state.

    Args:
        fn: the field; ``context`` is a dict of batch-first tensors (subset with the batch when
            samples freeze), or ``None``.
        populations: name -> width of the buffer's segments, in order, for error messages (a
            diverging solve names the population that blew up); ``None``: one population ``state``.
        kernels: backend name -> the same field's steps in that backend (:mod:`leastcontrol.native`).
    """

    fn: FlatFn
    populations: Mapping[str, int] | None = None
    kernels: Mapping[str, object] = field(default_factory=dict)

    def __call__(self, z: torch.Tensor, context) -> torch.Tensor:
        return self.fn(z, context)

    def culprit(self, z: torch.Tensor) -> str:
        """The population of rows ``z`` that blew up: the first non-finite segment, else (a norm that
        overflowed) the one with the largest entry."""
        segments = list((self.populations or {"state": z.shape[1]}).items())
        largest, start = [], 0
        for name, width in segments:
            part = z[:, start:start + width]
            if not bool(torch.isfinite(part).all()):
                return name
            largest.append((float(part.abs().max()) if part.numel() else 0.0, name))
            start += width
        return max(largest)[1]


def relative_residual(g: torch.Tensor, z: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """Per-sample ``‖g‖ / ‖z‖`` of flat ``(B, N)`` rows, shape ``(B,)``: over the whole row, or with
    ``groups`` (widths along dim 1) the largest of the groups' own ratios.

    Per-group residuals keep a small population that is still growing (a control starting from
    zero beside a large, settled state) from hiding behind the norm of the others.
    """
    if groups is None:
        return (g.pow(2).sum(1) / z.pow(2).sum(1).clamp_min(_TINY)).sqrt()
    ratios = [gp.pow(2).sum(1) / zp.pow(2).sum(1).clamp_min(_TINY)
              for gp, zp in zip(g.split(list(groups), 1), z.split(list(groups), 1))]
    return torch.stack(ratios).amax(0).sqrt()


def check_groups(groups, width: int) -> Tuple[int, ...] | None:
    """``groups`` as a tuple of positive widths summing to ``width`` (or ``None``), else a ConfigError."""
    if groups is None:
        return None
    if isinstance(groups, str) or not (len(groups) >= 1 and all(isinstance(w, int) and w >= 1 for w in groups)):
        raise ConfigError(f"groups must be positive integer widths, 'populations' or None, got {groups!r}")
    if sum(groups) != width:
        raise ConfigError(f"groups {tuple(groups)} must split the state's {width} columns")
    return tuple(groups)


class Layout:
    """Converts between a user's state (tensor, tuple or dict of ``(B, …)`` tensors) and a flat ``(B, N)`` buffer."""

    def __init__(self, state0):
        if isinstance(state0, torch.Tensor):
            self.kind, self.names, entries = "tensor", ["state"], [state0]
        elif isinstance(state0, (tuple, list)):
            self.kind, self.names, entries = "tuple", [str(i) for i in range(len(state0))], list(state0)
        elif isinstance(state0, dict):
            self.kind, self.names, entries = "dict", list(state0), list(state0.values())
        else:
            raise ConfigError(f"state must be a tensor, tuple or dict of tensors, got {type(state0).__name__}")
        if not self.names:
            raise ConfigError("state is empty")
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in entries):
            raise ConfigError("every entry of the state must be a tensor with a batch dimension first")
        batch = {t.shape[0] for t in entries}
        if len(batch) != 1:
            raise ConfigError(f"all populations need the same batch size, got {sorted(batch)}")
        self.shapes = [t.shape[1:] for t in entries]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.flat0 = self.pack_entries(entries)

    @property
    def populations(self) -> Dict[str, int]:
        return dict(zip(self.names, self.sizes))

    def pack_entries(self, entries) -> torch.Tensor:
        if len(entries) == 1:
            return entries[0].reshape(entries[0].shape[0], -1)
        return torch.cat([t.reshape(t.shape[0], -1) for t in entries], dim=1)

    def pack(self, state) -> torch.Tensor:
        if self.kind == "tensor":
            return self.pack_entries([state])
        return self.pack_entries(list(state.values()) if self.kind == "dict" else list(state))

    def unpack(self, z: torch.Tensor):
        parts = [z] if len(self.sizes) == 1 else torch.split(z, self.sizes, dim=1)
        entries = [p.reshape(p.shape[0], *s) for p, s in zip(parts, self.shapes)]
        if self.kind == "tensor":
            return entries[0]
        if self.kind == "tuple":
            return tuple(entries)
        return dict(zip(self.names, entries))

    def field(self, fn, with_context: bool) -> Field:
        """The user's ``fn(state[, context])`` as a :class:`Field` on the flat buffer."""
        if with_context:
            flat = lambda z, ctx: self.pack(fn(self.unpack(z), ctx))   # noqa: E731
        else:
            flat = lambda z, ctx: self.pack(fn(self.unpack(z)))        # noqa: E731
        return Field(flat, self.populations)
