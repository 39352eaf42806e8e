"""What a solver is: the driver's settings (when a solve stops, how its steps run) and a step rule.

A step rule is a small interface, in the style of optimistix's ``init / step``: :meth:`Solver.init`
builds the rule's per-sample memory (``carry``), :meth:`Solver.step` takes one step on the flat
``(B, N)`` state and returns the relative residual of that step. The loop, the convergence checks,
the stopping rule, per-sample freezing, the check-level mix and the trace belong to one driver
(:func:`leastcontrol.solvers.driver.solve`); the backends (eager, compiled, C) run the steps.

A new step rule is a dataclass that subclasses :class:`Solver`, writes :meth:`step` (and
:meth:`init` if it keeps a memory) and registers itself with :func:`register_solver`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Sequence, Tuple

import torch

from ..errors import ConfigError
from ..registry import Registry
from .backends import check_backends
from .mixing import CheckMix
from .stopping import StoppingRule


def _positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _number(name: str, value, *, low: float = 0.0, strict: bool = True, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if strict else value >= low)):
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}"
                          f"{' (or None)' if none_ok else ''}, got {value!r}")


@dataclass
class Solver:
    """Settle ``ṡ = g(s)``: a step rule run by the driver until every sample stops.

    Driver settings (every solver has them):

    Args:
        tol: a sample converges when its relative residual ``‖s_{t+1} − s_t‖ / ‖s_t‖`` (per
            population with ``groups``, see :meth:`solve`) is below this.
        max_steps: at most this many steps.
        dt: the step of the fixed-point map ``T(s) = s + dt·g(s)`` the rules solve.
        check_every: convergence checks every k steps (each check costs a few norms and a sync).
        patience: the stall rule (off by default): a sample whose residual has not fallen by 10 % in
            ``patience`` steps stops there (status ``STALLED``), if below ``stall_tol``. For dynamics
            whose iterates chatter at a residual floor above ``tol`` (ReLU kinks).
        stall_tol: see ``patience`` (``None``: any residual).
        freeze: a sample that stops leaves the batch, so a few slow samples do not make the whole
            batch pay (needs the field's batch-aligned data passed as ``context``).
        mix: check-level Anderson mixing of the runs between checks (:class:`CheckMix`), or None.
        backend: how the steps run, in order of preference for each run of steps: ``eager``
            (PyTorch operations), ``compile`` (the steps between two checks as one
            ``torch.compile`` graph; the first solve of each field compiles, for seconds),
            ``native`` (C steps for at most 16 active samples, where the field has them: the
            recurrent network on the CPU, see :mod:`leastcontrol.native`). Eager runs whatever the
            others cannot. E.g. ``("native", "compile")``: the tail in C, the bulk compiled.
        check_stability: after the solve, estimate each sample's Euler-map spectral radius at the
            returned state (:func:`~leastcontrol.solvers.euler_map_radius`, 30 Jacobian-vector
            products) into ``stats.sample_radius`` and warn when a sample settled where the plain
            dynamics move away. Off by default: it costs more than most solves.

    Raises:
        ConfigError: at construction, for any invalid setting.
    """

    name: ClassVar[str] = "solver"
    # Capabilities a backend reads: the rule's steps are plain Euler steps (a C kernel of the
    # field can run them); its steps go through ``run`` and can be traced by torch.compile.
    plain_euler_steps: ClassVar[bool] = False
    compilable: ClassVar[bool] = False

    tol: float = 1e-6
    max_steps: int = 800
    dt: float = 1.0
    check_every: int = 10
    patience: int | None = None
    stall_tol: float | None = None
    freeze: bool = True
    mix: CheckMix | None = None
    backend: Tuple[Any, ...] = ("eager",)
    check_stability: bool = False

    def __post_init__(self):
        _number("tol", self.tol, strict=False)
        _positive_int("max_steps", self.max_steps)
        _number("dt", self.dt)
        _positive_int("check_every", self.check_every)
        if self.patience is not None:
            _positive_int("patience", self.patience)
        _number("stall_tol", self.stall_tol, none_ok=True)
        for flag in ("freeze", "check_stability"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.mix, dict):
            self.mix = CheckMix(**self.mix)
        if self.mix is not None and not isinstance(self.mix, CheckMix):
            raise ConfigError(f"mix must be a CheckMix (or a table of its settings), got {self.mix!r}")
        self.backend = tuple([self.backend] if isinstance(self.backend, str) or not isinstance(self.backend, (list, tuple))
                             else self.backend)
        self._backends = check_backends(self.backend, self)

    # --- the step rule ---------------------------------------------------------------
    def init(self, fn, z: torch.Tensor, context) -> Any:
        """The rule's per-sample memory at the start ``z`` (batch-first tensors), or None."""
        return None

    def step(self, fn, z: torch.Tensor, context, carry, t: int, groups) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """One step, the ``t``-th (from 1), of the field ``fn(z, context)`` from the flat ``(B, N)`` ``z``.

        Returns:
            ``(z_next, residual, carry)``; ``residual`` ``(B,)`` is the step's relative residual,
            ``relative_residual(z_next − z, z, groups)`` for a plain step.
        """
        raise NotImplementedError(f"{type(self).__name__} writes no step")

    def advance(self, fn, z, context, carry, n: int, step: int, groups, run: Callable):
        """``n`` steps from step ``step``; ``(z, residual of the last step, carry)``. ``run(f, *args)`` runs
        a pure function the way the backend runs steps (e.g. compiled); rules that fuse their steps use it."""
        res = None
        for t in range(step + 1, step + n + 1):
            z, res, carry = self.step(fn, z, context, carry, t, groups)
        return z, res, carry

    def outcome(self, z: torch.Tensor, carry) -> torch.Tensor:
        """The state a sample keeps if it stops now (e.g. the best iterate of an accelerated rule)."""
        return z

    def diverged_state(self, z: torch.Tensor, carry) -> torch.Tensor:
        """Where to look for the population that blew up in a sample whose residual is not finite."""
        return z

    def subset(self, carry, keep: torch.Tensor):
        """The memory of the rows ``keep`` (default: every batch-first tensor of a tuple is indexed)."""
        if carry is None:
            return None
        if isinstance(carry, torch.Tensor):
            return carry[keep]
        items = [t[keep] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t for t in carry]
        return type(carry)(*items) if hasattr(carry, "_fields") else type(carry)(items)

    def totals(self, carry) -> Dict[str, int]:
        """The rule's own counters for the stats (e.g. Anderson's fallbacks and restarts)."""
        return {}

    # --- driver --------------------------------------------------------------------------
    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.tol, self.patience, math.inf if self.stall_tol is None else float(self.stall_tol))

    def solve(self, field, state0, context: Dict[str, torch.Tensor] | None = None, *,
              groups: Sequence[int] | str | None = None, throw: bool = True):
        """Settle ``ds/dt = field(s)`` (``field(s, context)`` when ``context`` is given).

        Args:
            field: a function of the state (tensor, tuple or dict of batch-first tensors), or a
                :class:`~leastcontrol.solvers.Field` on one flat ``(B, N)`` buffer.
            state0: the initial state, same structure.
            context: batch-aligned tensors the field reads (inputs, targets); with it the driver
                can drop samples that stopped (``freeze``).
            groups: ``None``: one relative residual over the whole state; ``"populations"``: each
                population (dict entry, tuple element, or :class:`Field` segment) to ``tol`` in its
                own; or widths along the flat buffer.
            throw: a diverged sample raises :class:`~leastcontrol.errors.SolverDivergedError`
                naming the population (else it is reported as ``Status.DIVERGED``).
        Returns:
            :class:`~leastcontrol.solvers.SolveResult`: the final state (same structure as
            ``state0``) and per-sample status codes and stats.
        """
        from .driver import solve
        return solve(self, field, state0, context, groups=groups, throw=throw)

    def replace(self, **changes) -> "Solver":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain data: ``{"name": ..., setting: value, ...}`` (see :func:`solver_from_dict`)."""
        out: Dict[str, Any] = {"name": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, CheckMix):
                value = dataclasses.asdict(value)
            elif f.name == "backend":
                value = [b.name for b in self._backends]
            out[f.name] = value
        return out

    def __repr__(self):
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if f.name != "backend" and getattr(self, f.name) != f.default]
        names = tuple(b.name for b in self._backends)
        if names != ("eager",):
            changed.append(f"backend={names}")
        return f"{type(self).__name__}({', '.join(changed)})"


SOLVERS: Registry[Solver] = Registry("solver")


def register_solver(name: str, *, overwrite: bool = False):
    """Class decorator: make a :class:`Solver` subclass available by ``name`` (configs, ``--set``)."""
    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise ConfigError(f"register_solver('{name}') needs a Solver subclass, got {cls!r}")
        cls.name = name
        SOLVERS.register(name, cls, overwrite=overwrite)
        return cls
    return wrap


def get_solver(name: str, **settings) -> Solver:
    """Build a registered solver (``euler``, ``anderson``, ``broyden``, ``adam``, or a user's) with its settings."""
    return solver_from_dict({"name": name, **settings})


def solver_from_dict(data: Dict[str, Any] | Solver | str, base: Solver | None = None) -> Solver:
    """A solver from plain data: a table of settings with an optional ``name`` (as :meth:`Solver.to_dict`
    writes it), a name, or a solver (returned as it is).

    With ``base``, a table changes ``base``: without a ``name``, or with ``base``'s, it is
    ``base.replace(**settings)``; with another rule's name, that rule keeps ``base``'s driver settings
    (tolerances, budget, checks, backend) and takes its own from the table. Without ``base`` a table
    builds a fresh solver (``name`` default ``euler``).

    Raises:
        ConfigError: an unknown rule or setting, naming the valid ones; an invalid value.
    """
    if isinstance(data, Solver):
        return data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(f"a solver is a table of settings with an optional 'name', got {data!r}")
    settings = dict(data)
    rule = settings.pop("name", base.name if base is not None else "euler")
    cls = SOLVERS.factory(rule)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} of the '{rule}' solver; valid: {', '.join(sorted(valid))}")
    if base is None:
        return cls(**settings)
    if type(base) is cls:
        return base.replace(**settings)
    shared = {f.name: getattr(base, f.name) for f in fields(Solver)}
    return cls(**{**shared, **settings})


class BestIterateSolver(Solver):
    """A rule that steps away from where it measured the residual (a mix, a secant step) and returns
    each sample's best iterate. Its memory (a NamedTuple) holds ``best_z``, ``best_r``, the counters
    ``fallbacks`` and ``restarts``, and ``probe``/``seen`` (:func:`hold_first_nonfinite`)."""

    @staticmethod
    def checked(res: torch.Tensor, best_r: torch.Tensor) -> torch.Tensor:
        """What the check reads: the best residual, or the current one where it is not finite (diverged)."""
        return torch.where(torch.isfinite(res), best_r, res)

    def outcome(self, z, carry):
        return carry.best_z

    def diverged_state(self, z, carry):
        return torch.where(carry.seen[:, None], carry.probe, z)

    def totals(self, carry):
        return {"fallbacks": int(carry.fallbacks), "restarts": int(carry.restarts)}


def hold_first_nonfinite(res: torch.Tensor, point: torch.Tensor, probe: torch.Tensor, seen: torch.Tensor):
    """``(probe, seen)`` updated with ``point`` for the samples whose residual ``res`` is not finite for the
    first time: a rule that mixes populations in its steps spreads a NaN over the whole state within
    a step, so the state where it first showed is what names the population that blew up."""
    bad = ~torch.isfinite(res)
    if not bool(bad.any()):
        return probe, seen
    return torch.where((bad & ~seen)[:, None], point, probe), seen | bad
