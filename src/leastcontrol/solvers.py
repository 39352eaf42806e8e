"""Fixed-point solvers for equilibrium dynamics ``ṡ = g(s)``.

Every solver has the same small interface::

    result = solver.solve(field, state0)      # field: state -> ds/dt
    result.state, result.stats.iterations, result.stats.converged

States are dicts of tensors (one per population, batch first), tuples of
tensors, or single tensors. Convergence is the per-sample relative residual
``‖s_{t+1} − s_t‖ / ‖s_t‖`` over all populations together, maximum over the
batch, below ``tol``; or ``max_iter`` steps. A state that becomes NaN/Inf
raises :class:`~leastcontrol.errors.SolverDivergedError` naming the population.
Not converging within ``max_iter`` is reported in the stats, not raised
(``require_convergence=True`` raises instead).
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch

from .errors import ConfigError, LeastControlError, SolverDivergedError, UnstableEquilibriumWarning
from .registry import Registry

Field = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
_TINY = 1e-30
# The stall rule: a sample stalls when its residual has not fallen below this fraction of
# its last mark in `patience` steps (chatter at a floor moves it by a few per cent).
_STALL_RATIO = 0.9
# How a controlled solve counts as settled: each population by its own relative residual
# (``groups``), or one relative residual over the whole state.
CONTROLLED_RESIDUALS = ("per-population", "joint")
# A sample counts as unstable when its estimated Euler-map spectral radius exceeds 1 by more
# than the Krylov estimate's resolution (see euler_map_radius).
UNSTABLE_RADIUS = 1.01
# Jacobian-vector products per sample of that estimate (the dimension of its Krylov space).
KRYLOV = 30


def check_controlled_residual(rule: str) -> str:
    """``rule`` if it is one of :data:`CONTROLLED_RESIDUALS`, else a :class:`ConfigError` naming them."""
    if rule not in CONTROLLED_RESIDUALS:
        raise ConfigError(f"unknown controlled_residual '{rule}'; valid: {', '.join(CONTROLLED_RESIDUALS)}")
    return rule


@dataclass
class SolverStats:
    """What a solve did.

    Attributes:
        iterations: steps taken.
        residual: final relative residual (max over the batch).
        converged: ``residual < tol`` was reached within ``max_iter``.
        converged_fraction: fraction of samples whose own residual is below ``tol``.
        trace: residual at every convergence check.
        fallbacks: (Anderson) steps where the least-squares solve failed and a plain step was used.
        mean_sample_iterations: steps per sample, averaged (below ``iterations`` when samples freeze).
        restarts: (Anderson) safeguard restarts from a sample's best iterate.
        stalled_fraction: fraction of samples stopped by the stall rule (``patience``) above ``tol``.
        sample_iterations: ``(B,)`` steps each sample took before it stopped (``None`` where a
            solver does not track samples).
        sample_residuals: ``(B,)`` each sample's relative residual where it stopped; with
            ``sample_iterations`` it tells which samples settled slowly, stalled or hit ``max_iter``.
        sample_radius: ``(B,)`` with ``check_stability``: each sample's estimated spectral radius
            of the Euler map ``I + dt·∂_s g`` at the returned state (:func:`euler_map_radius`).
        unstable_fraction: with ``check_stability``: fraction of samples whose radius exceeds
            ``UNSTABLE_RADIUS``, fixed points the plain dynamics leave.
    """

    iterations: int
    residual: float
    converged: bool
    converged_fraction: float
    trace: List[float] = dc_field(default_factory=list)
    fallbacks: int = 0
    mean_sample_iterations: float | None = None
    restarts: int = 0
    stalled_fraction: float = 0.0
    sample_iterations: torch.Tensor | None = None
    sample_residuals: torch.Tensor | None = None
    sample_radius: torch.Tensor | None = None
    unstable_fraction: float | None = None


@dataclass
class SolveResult:
    state: object
    stats: SolverStats


def _pack(d: Dict[str, torch.Tensor], names) -> torch.Tensor:
    """The populations ``names`` of ``d`` side by side, ``(B, N)`` (one population: a view, not a copy)."""
    if len(names) == 1:
        return d[names[0]].reshape(d[names[0]].shape[0], -1)
    return torch.cat([d[k].reshape(d[k].shape[0], -1) for k in names], dim=1)


class _Layout:
    """Converts between the user's state structure and a dict of ``(B, …)`` tensors."""

    def __init__(self, state0, labels=None):
        self.labels = labels or {}
        if isinstance(state0, torch.Tensor):
            self.kind, self.names = "tensor", ["state"]
            self.as_dict = {"state": state0}
        elif isinstance(state0, (tuple, list)):
            self.kind, self.names = "tuple", [str(i) for i in range(len(state0))]
            self.as_dict = dict(zip(self.names, state0))
        elif isinstance(state0, dict):
            self.kind, self.names = "dict", list(state0)
            self.as_dict = dict(state0)
        else:
            raise TypeError(f"state must be a tensor, tuple or dict of tensors, got {type(state0).__name__}")
        if not self.names:
            raise ValueError("state is empty")
        batch = {t.shape[0] for t in self.as_dict.values()}
        if len(batch) != 1:
            raise ValueError(f"all populations need the same batch size, got {sorted(batch)}")
        self.shapes = {k: t.shape for k, t in self.as_dict.items()}
        self.sizes = [math.prod(self.shapes[k][1:]) for k in self.names]

    def to_user(self, d):
        if self.kind == "tensor":
            return d["state"]
        if self.kind == "tuple":
            return tuple(d[k] for k in self.names)
        return d

    def from_user(self, s):
        if self.kind == "tensor":
            return {"state": s}
        if self.kind == "tuple":
            return dict(zip(self.names, s))
        return s

    def wrap(self, field: Field, with_context: bool = False):
        if with_context:
            return lambda d, ctx: self.from_user(field(self.to_user(d), ctx))
        return lambda d, ctx=None: self.from_user(field(self.to_user(d)))

    def pack(self, d) -> torch.Tensor:
        return _pack(d, self.names)

    def unpack(self, z: torch.Tensor):
        if len(self.names) == 1:
            return {self.names[0]: z.reshape(z.shape[0], *self.shapes[self.names[0]][1:])}
        parts = torch.split(z, self.sizes, dim=1)
        return {k: p.reshape(p.shape[0], *self.shapes[k][1:]) for k, p in zip(self.names, parts)}

    def first_nonfinite(self, d) -> str:
        """The population that blew up: the first non-finite one, else (norm overflow) the largest."""
        for k in self.names:
            if not torch.isfinite(d[k]).all():
                return self._segment(k, d[k])
        key = max(self.names, key=lambda k: float(d[k].abs().max()) if d[k].numel() else 0.0)
        return self._segment(key, d[key])


    def _segment(self, key, t) -> str:
        """For a packed buffer with ``labels[key] = [(name, width), ...]``: the first non-finite
        segment, else (norm overflow) the one with the largest entry."""
        segments, start = [], 0
        for name, width in self.labels.get(key, ()):
            part = t[:, start:start + width]
            if not torch.isfinite(part).all():
                return name
            segments.append((float(part.abs().max()) if part.numel() else 0.0, name))
            start += width
        return max(segments)[1] if segments else key


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of one ``(B, …)`` tensor, shape ``(B,)``."""
    return t.reshape(t.shape[0], -1).pow(2).sum(1)


def _sq_norms(d) -> torch.Tensor:
    """Per-sample squared norm over all populations, shape ``(B,)``."""
    return sum(_sq_norm(t) for t in d.values())


def _relative_residual(g, s, groups: Sequence[int] | str | None = None) -> torch.Tensor:
    """Per-sample ``‖g‖ / ‖s‖``, shape ``(B,)``: over the whole state, or the largest over ``groups``.

    ``groups`` gives each group its own relative residual, so a small population that is still
    growing (a control starting from zero beside a large, already settled state) is not hidden
    by the norm of the others: widths along dim 1 of a single flat buffer, or ``"entries"`` for
    one group per entry of the state (dict key or tuple element).
    """
    if groups is None:
        return (_sq_norms(g) / _sq_norms(s).clamp_min(_TINY)).sqrt()
    if groups == "entries":
        pairs = [(g[k], s[k]) for k in s]
    else:
        (gz,), (z,) = g.values(), s.values()
        pairs = list(zip(gz.split(list(groups), 1), z.split(list(groups), 1)))
    ratios = [_sq_norm(gp) / _sq_norm(zp).clamp_min(_TINY) for gp, zp in pairs]
    return torch.stack(ratios).amax(0).sqrt()


def _euler_radius(layout: _Layout, g_field, d: Dict[str, torch.Tensor], context, dt: float, krylov: int,
                  seed: int) -> torch.Tensor:
    """:func:`euler_map_radius` on the dict state ``d`` of ``layout``, with a field ``g_field(d, context)``."""
    first = d[layout.names[0]]
    B, N = first.shape[0], sum(layout.sizes)
    k = min(krylov, N)
    # The basis lives in float64 whatever the state's precision: only the products are in the
    # field's dtype, whose rounding (relative eps) then bounds where the Krylov space stops.
    f64 = dict(dtype=torch.float64, device=first.device)
    floor = 100 * torch.finfo(first.dtype).eps

    def euler_jvp(q):   # (I + dt·∂g) q, flat, float64
        _, jg = torch.func.jvp(lambda s: g_field(s, context), (d,), (layout.unpack(q.to(first.dtype)),))
        return q + dt * layout.pack(jg).double()

    gen = torch.Generator(device=first.device).manual_seed(seed)
    q = torch.randn(B, N, generator=gen, **f64)
    Q = torch.zeros(B, k + 1, N, **f64)   # the orthonormal basis, one row per vector
    Q[:, 0] = q / q.norm(dim=1, keepdim=True)
    H = torch.zeros(B, k + 1, k, **f64)
    with warnings.catch_warnings():
        # torch.func.jvp's first call imports torch's decompositions, which warn (once) about
        # their own use of the deprecated torch.jit.script.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")
    with torch.no_grad():   # forward-mode only: no graph for a backward pass
        for j in range(k):
            w = euler_jvp(Q[:, j])
            scale = w.norm(dim=1).clamp_min(1.0)
            basis = Q[:, :j + 1]
            h = torch.zeros(B, j + 1, **f64)
            for _ in range(2):   # Gram-Schmidt twice: the basis stays orthogonal to rounding
                c = torch.bmm(basis, w[:, :, None]).squeeze(-1)
                w = w - torch.bmm(c[:, None, :], basis).squeeze(1)
                h = h + c
            norm = w.norm(dim=1)
            H[:, :j + 1, j], H[:, j + 1, j] = h, norm
            # What is left at the products' rounding is no new direction: the Krylov space is
            # invariant, its Ritz values are exact, and the next vectors stay zero.
            Q[:, j + 1] = torch.where((norm > floor * scale)[:, None], w / norm.clamp_min(_TINY)[:, None], 0.0)
    return torch.linalg.eigvals(H[:, :k, :]).abs().amax(1)


def euler_map_radius(field: Field, state, context: Dict[str, torch.Tensor] | None = None, *, dt: float = 1.0,
                     krylov: int = KRYLOV, seed: int = 0) -> torch.Tensor:
    """Each sample's spectral radius ``ρ(I + dt·∂_s g(s))`` of the Euler map's Jacobian at ``state``.

    At a fixed point ``g(s*) = 0``, ``ρ < 1`` means the Euler dynamics settle there (linear
    stability); ``ρ > 1`` means they move away from it: the state is a root of ``g``, as an
    accelerated solver (Anderson, Broyden) may find it, but not where the system settles on its
    own, and an Euler phase started there (an adjoint, a controlled phase) grows.

    Arnoldi iteration with forward-mode Jacobian-vector products (``torch.func.jvp``; no Jacobian
    is formed): ``krylov`` products per sample from a random start build an orthonormal basis of
    the Krylov space and the small Hessenberg matrix ``H`` of ``J`` on it; the estimate is the
    largest modulus of ``H``'s eigenvalues (the Ritz values). The outermost eigenvalues, a complex
    pair included, converge first, geometrically in ``krylov``; with ``krylov`` at least the
    state's width the result is exact. ``UNSTABLE_RADIUS`` (1.01) leaves a margin for the rest.

    The field must act on each sample separately (true of the built-in systems and methods), so
    the batched product gives every sample its own radius.

    Args:
        field: the vector field, ``field(state)`` or ``field(state, context)``.
        state: where to linearise (tensor, tuple or dict of tensors, batch first).
        context: batch-aligned tensors the field reads, as in :meth:`Solver.solve`.
        dt: the Euler step. krylov: Jacobian-vector products per sample (the Krylov space's
            dimension). seed: of the random start.
    Returns:
        ``(B,)`` float64 radii.
    Raises:
        ConfigError: ``krylov`` not a positive integer.

    >>> r = euler_map_radius(lambda s: -0.5 * s, torch.ones(3, 4))
    >>> [round(float(v), 6) for v in r]
    [0.5, 0.5, 0.5]

    Reference: the Euler dynamics of Meulemans et al., NeurIPS 2022 (dt = 1, τ = 1).
    """
    if not (isinstance(krylov, int) and not isinstance(krylov, bool) and krylov >= 1):
        raise ConfigError(f"krylov must be a positive integer, got {krylov!r}")
    layout = _Layout(state)
    return _euler_radius(layout, layout.wrap(field, context is not None), layout.as_dict, context, float(dt),
                         krylov, seed)


class Solver:
    """Common configuration and validation of the fixed-point solvers.

    Args:
        dt: step size of the dynamics (the fixed-point map is ``s + dt·g(s)``).
        tol: relative-residual tolerance (per sample, max over the batch).
        max_iter: maximum number of steps.
        check_every: test convergence (a device sync) every k steps.
        require_convergence: raise instead of returning an unconverged state.
        patience: stall rule, off by default. A sample whose residual has not fallen by 10 % in the
            last ``patience`` steps stops there, converged or not (``stats.stalled_fraction``).
            For non-smooth dynamics (ReLU kinks) whose Euler iterates chatter at a residual
            floor above ``tol``: the state no longer improves, so further steps only cost.
        stall_tol: a stalled sample stops only if its residual is below this (``None``: any).
        groups: the residual is the largest of the groups' own relative residuals: for a state
            that is one flat ``(B, N)`` buffer, the widths of its groups along dim 1 (summing to
            N); ``"entries"``: one group per entry of a dict or tuple state. ``None`` (default):
            one relative residual over the whole state.
        check_stability: after the solve, estimate each sample's Euler-map spectral radius at the
            returned state (:func:`euler_map_radius`, 30 Jacobian-vector products) into
            ``stats.sample_radius`` and ``stats.unstable_fraction``, and warn
            (:class:`~leastcontrol.errors.UnstableEquilibriumWarning`) when a sample settled at a
            fixed point the plain dynamics leave. Off by default: it costs more than most solves.
    """

    name = "solver"

    def __init__(self, dt: float = 1.0, tol: float = 1e-6, max_iter: int = 800, *,
                 check_every: int = 1, require_convergence: bool = False,
                 patience: int | None = None, stall_tol: float | None = None,
                 groups: Sequence[int] | str | None = None, check_stability: bool = False):
        if not isinstance(check_stability, bool):
            raise ConfigError(f"check_stability must be True or False, got {check_stability!r}")
        self.check_stability = check_stability
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ConfigError(f"dt must be a positive number, got {dt!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ConfigError(f"tol must be >= 0, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ConfigError(f"check_every must be a positive integer, got {check_every!r}")
        if patience is not None and not (isinstance(patience, int) and patience >= 1):
            raise ConfigError(f"patience must be a positive integer (or None: no stall rule), got {patience!r}")
        if stall_tol is not None and not (isinstance(stall_tol, (int, float)) and stall_tol > 0):
            raise ConfigError(f"stall_tol must be > 0 (or None: any residual), got {stall_tol!r}")
        self.dt, self.tol, self.max_iter = float(dt), float(tol), max_iter
        self.check_every, self.require_convergence = check_every, require_convergence
        if groups is not None and groups != "entries":
            if isinstance(groups, str) or not (len(groups) >= 1 and all(isinstance(w, int) and w >= 1 for w in groups)):
                raise ConfigError(f"groups must be positive integer widths or 'entries', got {groups!r}")
            groups = tuple(groups)
        self.groups = groups
        self.patience = patience
        self.stall_tol = math.inf if stall_tol is None else float(stall_tol)

    def _layout(self, state0, labels) -> _Layout:
        """The state's layout; with ``groups``, checked against the one flat buffer they split."""
        layout = _Layout(state0, labels)
        # The solvers that step one packed buffer see the entries as its widths.
        layout.flat_groups = tuple(layout.sizes) if self.groups == "entries" else self.groups
        if self.groups not in (None, "entries") and (len(layout.names) != 1 or sum(self.groups) != layout.sizes[0]):
            raise ConfigError(f"groups {self.groups} must split one flat buffer of width {sum(self.groups)}; "
                              f"got populations {dict(zip(layout.names, layout.sizes))}")
        return layout

    def _freezer(self, template: Dict[str, torch.Tensor], enabled: bool) -> "_Freezer":
        return _Freezer(template, enabled, self.patience, self.stall_tol)

    def __repr__(self):
        return f"{type(self).__name__}(dt={self.dt}, tol={self.tol}, max_iter={self.max_iter})"

    def solve(self, field: Field, state0, context: Dict[str, torch.Tensor] | None = None,
              labels: Dict[str, list] | None = None) -> SolveResult:
        """Settle ``ds/dt = field(s)`` (or ``field(s, context)`` when ``context`` is given).

        Args:
            field: the vector field, a function of the state (and of ``context``).
            state0: initial state: tensor, tuple or dict of tensors, batch first.
            context: batch-aligned tensors the field reads (e.g. inputs, targets).
            labels: for a state entry that packs several populations along dim 1,
                ``{key: [(population, width), ...]}``, so errors name the population.
        Returns:
            :class:`SolveResult` with the final state (same structure as ``state0``) and stats.
        Raises:
            SolverDivergedError: the state became NaN/Inf.
        """
        raise NotImplementedError

    def _finish(self, layout: _Layout, d, stats: SolverStats, g_field, context) -> SolveResult:
        if self.require_convergence and not stats.converged:
            raise LeastControlError(
                f"{self.name} did not converge: relative residual {stats.residual:.3g} > tol {self.tol:g} "
                f"after {stats.iterations} steps; raise max_iter, loosen tol or use the anderson solver"
            )
        if self.check_stability:
            self._check_stability(layout, g_field, d, context, stats)
        return SolveResult(layout.to_user(d), stats)

    def _check_stability(self, layout: _Layout, g_field, d, context, stats: SolverStats) -> None:
        """Fill ``stats.sample_radius`` and ``stats.unstable_fraction``; warn if a sample is unstable."""
        radius = _euler_radius(layout, g_field, d, context, self.dt, krylov=KRYLOV, seed=0)
        unstable = radius > UNSTABLE_RADIUS
        stats.sample_radius, stats.unstable_fraction = radius, float(unstable.double().mean())
        if bool(unstable.any()):
            warnings.warn(
                f"{self.name} settled {int(unstable.sum())} of {radius.numel()} samples at fixed points the plain "
                f"dynamics move away from (Euler-map spectral radius up to {float(radius.max()):.3g} > 1): the "
                "system would not settle there, and an Euler phase started there grows. Use solver='euler', or "
                "accelerate only close to a fixed point (a smaller start_below)",
                UnstableEquilibriumWarning, stacklevel=3)

    def _start(self, field, state0, context, labels):
        """Layout, packed field, flat start ``z`` ``(B, N)`` and freezer of the solvers that step one buffer."""
        layout = self._layout(state0, labels)
        z = layout.pack(layout.as_dict)
        return layout, layout.wrap(field, context is not None), z, self._freezer({"z": z}, self.freeze and context is not None)

    def _track(self, layout, frozen, trace, step, z, gz, best_z, best_r):
        """Each sample's residual ``‖gz‖/‖z‖`` and best iterate; at a convergence check, record, test, freeze.

        Returns:
            ``(res, best_z, best_r, stop, keep)``: ``stop`` when every sample is done (converged or
            stalled); ``keep`` the indices of the rows still iterating when some froze (the caller
            subsets its own tensors), else None.
        """
        res = _relative_residual({"z": gz}, {"z": z}, layout.flat_groups).double()
        improved = res < best_r
        best_r = torch.where(improved, res, best_r)
        best_z = torch.where(improved[:, None], z, best_z)
        if not (step % self.check_every == 0 or step == self.max_iter):
            return res, best_z, best_r, False, None
        if not bool(torch.isfinite(res).all()):
            raise SolverDivergedError(layout.first_nonfinite(layout.unpack(z + gz)), step, self.name)
        r = float(best_r.max())
        trace.append(r)
        finished, keep = frozen.freeze(frozen.check(best_r, self.tol, step), {"z": best_z})
        return res, best_z, best_r, finished, keep

    def _check(self, layout, residuals: torch.Tensor, d, step: int):
        r = float(residuals.max())
        if not math.isfinite(r):
            raise SolverDivergedError(layout.first_nonfinite(d), step, self.name)
        return r


class _Freezer:
    """Per-sample freezing shared by the solvers.

    Holds the final state of every sample that is done (converged, or stalled
    under the stall rule) and the indices of those still iterating; the solver
    keeps iterating on the active rows only, so a few slow samples do not make
    the whole batch pay. Also keeps, per active sample, the residual at its last 10 % fall
    and that step, which the stall rule reads. What the active rows share (their last
    residual and step) is written to the per-sample record only when they stop, so a check
    costs a few operations on the active rows, not a scatter into the whole batch.
    """

    def __init__(self, template: Dict[str, torch.Tensor], enabled: bool,
                 patience: int | None = None, stall_tol: float = math.inf):
        first = next(iter(template.values()))
        B, device = first.shape[0], first.device
        self.enabled, self.patience, self.stall_tol = enabled, patience, stall_tol
        f64 = {"dtype": torch.float64, "device": device}
        self.out = {k: v.clone() for k, v in template.items()} if enabled else None
        self.active = torch.arange(B, device=device)
        # Per sample, filled in as samples stop: final residual, steps taken, step of the last fall.
        self.final_res = torch.full((B,), math.inf, **f64)
        self.sample_steps = torch.zeros(B, **f64)
        self.mark_step = torch.zeros(B, **f64)
        # Per active sample: the last checked residual (at step `last_step`) and the stall marks.
        self.last_res, self.last_step = self.final_res.clone(), 0
        self.active_mark_res = torch.full((B,), math.inf, **f64)
        self.active_mark_step = torch.zeros(B, **f64)

    def check(self, res: torch.Tensor, tol: float, step: int) -> torch.Tensor:
        """Record the active rows' residuals ``res`` at ``step``; return those that stop: residual
        below ``tol``, or stalled (see :class:`Solver`'s ``patience``)."""
        res = res.double()
        self.last_res, self.last_step = res, step
        done = res < tol
        if self.patience:
            fell = res < _STALL_RATIO * self.active_mark_res
            self.active_mark_res = torch.where(fell, res, self.active_mark_res)
            self.active_mark_step = torch.where(fell, float(step), self.active_mark_step)
            done |= self._stalled(res, step, self.active_mark_step)
        return done

    def _stalled(self, res: torch.Tensor, steps, mark_step: torch.Tensor) -> torch.Tensor:
        """The stall rule: ``patience`` steps since the last 10 % fall, at a residual below ``stall_tol``."""
        stalled = steps - mark_step >= self.patience
        if self.stall_tol < math.inf:   # no stall tolerance: one comparison fewer per check
            stalled &= res < self.stall_tol
        return stalled

    def _record(self, rows: torch.Tensor, among: torch.Tensor | None) -> None:
        """Write the last residual, step and stall mark of the active rows ``among`` (all if None) for ``rows``."""
        pick = (lambda t: t) if among is None else (lambda t: t[among])
        self.final_res[rows] = pick(self.last_res)
        self.sample_steps[rows] = float(self.last_step)
        if self.patience:
            self.mark_step[rows] = pick(self.active_mark_step)

    def freeze(self, done: torch.Tensor, final: Dict[str, torch.Tensor]) -> Tuple[bool, torch.Tensor | None]:
        """Store the rows ``done`` of ``final``.

        Returns:
            ``(finished, keep)``: ``finished`` when every active row is done (nothing is stored: the
            caller's final state goes to :meth:`result`); ``keep`` the indices of the caller's rows
            that go on, when some stopped and freezing is on, else None.
        """
        stop = done.nonzero().squeeze(1)   # one read of the mask answers "all?", "any?" and "which?"
        if stop.numel() == done.numel():
            return True, None
        if not self.enabled or stop.numel() == 0:
            return False, None
        keep = (~done).nonzero().squeeze(1)
        rows = self.active[stop]
        for k, v in final.items():
            self.out[k][rows] = v[stop]
        self._record(rows, stop)
        self.active, self.last_res = self.active[keep], self.last_res[keep]
        if self.patience:
            self.active_mark_res, self.active_mark_step = self.active_mark_res[keep], self.active_mark_step[keep]
        return False, keep

    def absorb(self, final: Dict[str, torch.Tensor], res: torch.Tensor, stop_step: torch.Tensor,
               stopped: torch.Tensor, mark_res: torch.Tensor, mark_step: torch.Tensor, step: int) -> torch.Tensor:
        """Record a run that checked and stopped the active rows itself (Euler's native tail, :meth:`check`'s
        rule applied at each of its checks): per active row its state ``final`` (at its stop, or now), its
        last residual, the step of that check, whether it stopped, and the stall marks. Returns the
        indices of the rows that go on."""
        rows = self.active
        for k, v in final.items():
            self.out[k][rows] = v
        self.final_res[rows], self.sample_steps[rows] = res, stop_step
        if self.patience:
            self.mark_step[rows] = mark_step
        keep = (~stopped).nonzero().squeeze(1)
        self.active, self.last_res, self.last_step = rows[keep], res[keep], step
        if self.patience:
            self.active_mark_res, self.active_mark_step = mark_res[keep], mark_step[keep]
        return keep

    def result(self, final: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self.enabled:
            return final
        for k, v in final.items():
            self.out[k][self.active] = v
        return self.out

    def stats(self, step: int, tol: float, trace: List[float], fallbacks: int = 0, restarts: int = 0) -> SolverStats:
        self._record(self.active, None)
        r = float(self.final_res.max())
        converged = self.final_res < tol
        stalled = 0.0
        if self.patience:
            stalled = float((~converged & self._stalled(self.final_res, self.sample_steps, self.mark_step))
                            .double().mean())
        return SolverStats(step, r, r < tol, float(converged.double().mean()), trace, fallbacks,
                           float(self.sample_steps.mean()), restarts, stalled,
                           self.sample_steps.long(), self.final_res.clone())


def _subset(d: Dict[str, torch.Tensor] | None, keep: torch.Tensor):
    return None if d is None else {k: v[keep] for k, v in d.items()}


def _euler_add(s, g, dt: float):
    names = list(s)
    return dict(zip(names, torch._foreach_add([s[k] for k in names], [g[k] for k in names], alpha=dt)))


def _euler_steps(field, s, ctx, dt: float, n: int, groups):
    """``n`` Euler steps; returns ``s_n`` and each sample's residual of the last step, ``dt·‖g‖/‖s_{n−1}‖``."""
    for _ in range(n - 1):
        s = _euler_add(s, field(s, ctx), dt)
    g = field(s, ctx)
    return _euler_add(s, g, dt), dt * _relative_residual(g, s, groups)


@functools.lru_cache(maxsize=None)
def _compiled(steps):
    """``steps`` (:func:`_euler_steps` or :func:`_euler_steps_mixed`) through ``torch.compile``,
    built once each; the batch dimension is dynamic.

    One graph holds the ``check_every`` steps between two convergence checks and the residual
    read at the check (and, mixed, the check-level Anderson mix), so the elementwise work of a step
    is fused and Python runs once per check, not once per step.
    Fresh closures of the same field code reuse the graph (Dynamo guards on code, not identity).
    """
    # Inductor 2.13's lowering of the mix's small batched solve calls a helper it deprecated itself.
    warnings.filterwarnings("ignore", message=r".*torch\._prims_common\.check.*", category=FutureWarning)
    return torch.compile(steps, dynamic=True)


# Graphs one process may hold for the compiled steps: one per field (free, controlled, adjoint, ...
# of each method), with or without the mix, and batch regime (a batch of one is compiled apart);
# Dynamo's default is 8.
_COMPILED_GRAPHS = 64


def _run_compiled(steps, *args):
    import torch._dynamo  # noqa: F401  (for its exception types and config)
    try:
        with torch._dynamo.config.patch(recompile_limit=_COMPILED_GRAPHS):
            return _compiled(steps)(*args)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        raise ConfigError(f"compile=True needs a working torch.compile backend here (for the CPU, a C++ "
                          f"compiler): {type(err.inner_exception).__name__}: {err.inner_exception}; "
                          "run without compile (--compile off)") from None


def _group_index(widths, device) -> torch.Tensor | None:
    """For groups of ``widths`` along dim 1, the group of each column (``None`` without groups)."""
    if widths is None:
        return None
    return torch.repeat_interleave(torch.arange(len(widths), device=device), torch.tensor(widths, device=device))


def _group_weights(z: torch.Tensor, widths, group_of: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` float64: ``1/‖z_g‖`` of each column's group, the norm the per-group residual reads."""
    norms = torch.stack([_sq_norm(p) for p in z.split(list(widths), 1)], 1).double()
    return norms.clamp_min(_TINY).rsqrt()[:, group_of]


def _anderson_weights(gram: torch.Tensor, valid: torch.Tensor, reg: float):
    """Mixing weights α (B, m) minimising ‖Σ α_j G_j‖ with Σ α_j = 1 over the valid slots.

    ``gram`` (B, m, m, float64) holds the inner products ``G_i · G_j`` of the stored residuals;
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


# Active samples up to which a field's native steps run (Euler's native_batch): up to about 16 the C
# loop of the recurrent network's controlled field beats the compiled PyTorch steps (docs/performance.md).
NATIVE_BATCH = 16

_UNLIMITED = 2 ** 62   # returns to the best point: more than any solve has checks


class _MixMemory(NamedTuple):
    """What the check-level mix keeps per sample, oldest run first (see :func:`_check_mix`)."""
    F: torch.Tensor        # (B, m, N): the end points of the last m runs
    G: torch.Tensor        # (B, m, N) float64: their residuals F_j − x_j
    P: torch.Tensor        # (B, groups, m, m) float64: P[g, i, j] = G_{i,g} · G_{j,g}
    valid: torch.Tensor    # (B, m) bool: slots holding a run
    best: torch.Tensor     # (B,) float64: the smallest residual at a check so far
    best_z: torch.Tensor   # (B, N): the end point that had it
    left: torch.Tensor     # (B,) int64: returns to the best point left; −1: mixing stopped for good

    @staticmethod
    def empty(z: torch.Tensor, memory: int, groups: int, restarts: int | None = None) -> "_MixMemory":
        """No run stored yet, for the flat states ``z`` (B, N), each sample with ``restarts`` returns
        (``None``: no limit)."""
        B, N = z.shape
        f64 = dict(dtype=torch.float64, device=z.device)
        return _MixMemory(F=z.new_zeros(B, memory, N), G=torch.zeros(B, memory, N, **f64),
                          P=torch.zeros(B, groups, memory, memory, **f64),
                          valid=torch.zeros(B, memory, dtype=torch.bool, device=z.device),
                          best=torch.full((B,), math.inf, **f64), best_z=z.clone(),
                          left=torch.full((B,), _UNLIMITED if restarts is None else restarts,
                                          dtype=torch.int64, device=z.device))

    def subset(self, keep: torch.Tensor) -> "_MixMemory":
        return _MixMemory(*(t[keep] for t in self))


def _group_members(widths, n: int, device) -> torch.Tensor:
    """``(n, groups)`` float64 one-hot: the group of each of the ``n`` columns (one group without
    ``widths``), so that per-group sums are one product."""
    group_of = _group_index(widths, device)
    if group_of is None:
        return torch.ones(n, 1, dtype=torch.float64, device=device)
    return torch.nn.functional.one_hot(group_of, len(widths)).to(torch.float64)


def _check_mix(memory: _MixMemory, start: torch.Tensor, end: torch.Tensor, res: torch.Tensor,
               member: torch.Tensor, reg: float, restart: float) -> Tuple[torch.Tensor, _MixMemory]:
    """Anderson mixing (type II) of the map "``check_every`` Euler steps", one mix per check.

    ``memory`` holds, per sample, the last ``m`` pairs (start ``x_j``, end ``F_j``) of the runs of
    steps between two checks; the run ``start → end`` (flat ``(B, N)``, residual ``res`` at the
    check) joins it. Returns ``(Σ α_j F_j, memory with this run)``, α minimising
    ``‖Σ α_j (F_j − x_j)‖`` with ``Σ α_j = 1``, each group (``member``, ``(N, groups)``) weighed by
    ``1/‖s_g‖``, the norm the stopping rule reads. Over ten steps the slow modes of the Euler map, a
    lightly damped rotation included, are few and well separated, so a small memory captures them;
    the mixing costs a few small products per check, not per step.

    A sample whose residual at a check rises above ``restart`` times its best returns to its best
    end point with an empty memory, as long as it has returns left (``memory.left``, unlimited by
    default); once they are spent, the next such rise stops its mixing for the rest of the solve
    and it goes on with plain Euler steps from where it is. Returning is what settles a sample that
    Euler circles (the mix overshoots while its memory is short, then converges). It is also what
    traps a sample whose trajectory passes a saddle on its way to a stable root: the mix steers to
    the saddle, a root Euler leaves, and returning to the best point, next to the saddle, repeats
    the excursion every few checks without end. With no returns, Euler alone takes such a sample
    on to its stable root.

    The residuals ``G_j = F_j − x_j`` are kept in float64 with their inner products per group,
    ``P[g, i, j] = G_{i,g} · G_{j,g}``. A mix adds the new run's row of these and weighs the groups
    by the current ``1/‖s_g‖²``: a fixed, small number of operations whatever the memory and the
    number of groups, which is what a mix costs on the few samples of a solve's tail. The new run
    replaces the oldest, so every tensor keeps its shape and nothing is written in place: the same
    code runs eagerly and inside the compiled graph of the steps.
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
    alpha, ok = _anderson_weights(gram, valid, reg)
    mixed = torch.where((ok & (left >= 0))[:, None], torch.bmm(alpha[:, None, :].to(end.dtype), F).squeeze(1), end)
    valid = valid & ~blown[:, None] & (left >= 0)[:, None]
    return torch.where(back[:, None], best_z, mixed), _MixMemory(F, G, P, valid, best, best_z, left)


def _euler_steps_mixed(field, s, ctx, dt: float, n: int, groups, names, memory: _MixMemory,
                       member: torch.Tensor, reg: float, restart: float):
    """:func:`_euler_steps`, then the check-level mix of the run: ``(s_n, residual, next start, memory)``.

    ``names`` orders the populations of ``s`` in the flat buffer the mix works on. Compiled, the
    mix joins the steps' graph, so a check pays one compiled call instead of one plus the mix's
    few dozen small eager operations.
    """
    end, res = _euler_steps(field, s, ctx, dt, n, groups)
    mixed, memory = _check_mix(memory, _pack(s, names), _pack(end, names), res, member, reg, restart)
    return end, res, mixed, memory


class Euler(Solver):
    """Forward-Euler iteration ``s_{t+1} = s_t + dt · g(s_t)``.

    With ``freeze=True`` (default) a sample whose own relative residual is
    below ``tol`` at a convergence check is frozen: its state is final and it
    drops out of the batch the field is evaluated on, so a few slow samples do
    not make the whole batch pay. This needs the batch-aligned data the field
    reads (inputs, targets) passed as ``context``, which is subset alongside.

    With ``compile=True`` the ``check_every`` steps between two checks run as one
    ``torch.compile`` graph (same iterates up to floating-point order; the first solve of
    each field pays the compilation, seconds). It pays where a step is many small
    operations on a small batch (the tail of a solve, after most samples froze).

    With ``anderson_memory=m > 0`` each convergence check from step ``anderson_after`` on also
    mixes the last ``m`` runs of ``check_every`` steps (:func:`_check_mix`, Anderson
    acceleration of the ``check_every``-step Euler map): the steps stay plain, and the slow samples
    of a solve settle in fewer of them. With ``compile=True`` the mix runs in the steps' graph. The
    fixed point and the stopping rule are Euler's; only the path to it changes. ``restart``: a
    sample whose residual at a check exceeds this multiple of its best returns to its best point
    with an empty memory; ``anderson_restarts``: how many times it may (``None``, default: no
    limit); the next such rise stops its mixing and it goes on with plain Euler steps (0: the
    first rise does). No limit settles samples that Euler circles; 0 keeps samples that pass a
    saddle from being trapped there (:func:`_check_mix`). ``reg``: Tikhonov regularisation of the
    least squares, relative to their scale.

    A field may carry its own steps in C, ``field.native_steps`` (the methods attach them with
    ``native=True``; :class:`leastcontrol.native.RecurrentSteps`): ``n`` steps on the one flat
    buffer, and ``run``, the rest of a solve with its checks, stopping rule and mix, where it
    ``supports`` the residual this solver reads. Once at most ``native_batch`` samples are active,
    the rest of the solve is one ``run`` (without freezing: the runs between checks go through the
    C steps): the last few samples of a solve, where a PyTorch step costs its operations' dispatch.

    >>> res = Euler(dt=0.5, tol=1e-10, max_iter=200).solve(lambda s: {"x": 1 - s["x"]}, {"x": torch.zeros(2, 1)})
    >>> bool(res.stats.converged), round(float(res.state["x"][0]), 6)
    (True, 1.0)
    """

    name = "euler"

    def __init__(self, dt: float = 1.0, tol: float = 1e-6, max_iter: int = 800, *, freeze: bool = True,
                 compile: bool = False, anderson_memory: int = 0, anderson_after: int = 50,
                 restart: float = 10.0, anderson_restarts: int | None = None, reg: float = 1e-8,
                 native_batch: int = NATIVE_BATCH, **kwargs):
        super().__init__(dt, tol, max_iter, **kwargs)
        if not (isinstance(native_batch, int) and native_batch >= 0):
            raise ConfigError(f"native_batch must be an integer >= 0 (0: never native steps), got {native_batch!r}")
        self.native_batch = native_batch
        self.freeze = bool(freeze)
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be True or False, got {compile!r}")
        self.compile = compile
        if not (isinstance(anderson_memory, int) and anderson_memory >= 0):
            raise ConfigError(f"anderson_memory must be an integer >= 0 (0: plain Euler), got {anderson_memory!r}")
        if not (isinstance(anderson_after, int) and anderson_after >= 0):
            raise ConfigError(f"anderson_after must be an integer >= 0, got {anderson_after!r}")
        if not restart > 1:
            raise ConfigError(f"restart must be > 1, got {restart!r}")
        self.anderson_memory, self.anderson_after = anderson_memory, anderson_after
        if not (anderson_restarts is None or (isinstance(anderson_restarts, int) and anderson_restarts >= 0)):
            raise ConfigError(f"anderson_restarts must be an integer >= 0 or None (no limit), got {anderson_restarts!r}")
        self.restart, self.anderson_restarts, self.reg = float(restart), anderson_restarts, float(reg)

    def _run(self, steps, *args):
        """``steps(*args)``, through its compiled graph under ``compile``."""
        return _run_compiled(steps, *args) if self.compile else steps(*args)

    def solve(self, field: Field, state0, context: Dict[str, torch.Tensor] | None = None,
              labels: Dict[str, list] | None = None) -> SolveResult:
        layout = self._layout(state0, labels)
        g_field = layout.wrap(field, context is not None)
        s = layout.as_dict
        frozen = self._freezer(s, self.freeze and context is not None)
        ctx = context
        trace: List[float] = []
        memory = member = None   # of the check-level mix, from its first check on
        # The field's steps in C, on its one flat buffer, where they compute the residual this solver reads.
        native = getattr(field, "native_steps", None)
        if native is not None and not (ctx is not None and len(layout.names) == 1 and native.supports(self.groups)):
            native = None
        key = layout.names[0]

        def empty_memory():
            z = layout.pack(s)
            member = _group_members(layout.flat_groups, z.shape[1], z.device)
            return member, _MixMemory.empty(z, self.anderson_memory, member.shape[1], self.anderson_restarts)
        step = 0
        while step < self.max_iter:
            # Run to the next convergence check (every check_every steps, and at max_iter).
            n = min(self.check_every - step % self.check_every, self.max_iter - step)
            mixing = self.anderson_memory and self.anderson_after <= step + n < self.max_iter
            if mixing and memory is None:
                member, memory = empty_memory()
            in_c = native is not None and s[key].shape[0] <= self.native_batch
            if in_c and frozen.enabled:
                # The rest of the solve in one call: its checks, stopping rule and mix run in C too.
                mix = None
                if self.anderson_memory:
                    if memory is None:   # not mixing yet: the empty memory of the first mixing check
                        member, memory = empty_memory()
                    mix = (memory, self.anderson_after, self.reg, self.restart)
                run = native.run(s[key], ctx, self.dt, self.groups, step=step, check_every=self.check_every,
                                 max_iter=self.max_iter, tol=self.tol, patience=self.patience,
                                 stall_tol=self.stall_tol, stall_ratio=_STALL_RATIO,
                                 mark_res=frozen.active_mark_res, mark_step=frozen.active_mark_step, mix=mix)
                trace += run.trace
                if run.diverged:
                    raise SolverDivergedError(layout.first_nonfinite({key: run.z}), run.step, self.name)
                keep = frozen.absorb({key: run.z}, run.residual, run.stop_step, run.stopped, run.mark_res,
                                     run.mark_step, run.step)
                s, step = {key: run.z[keep]}, run.step
                break
            if in_c:   # without freezing: run by run, each checked here
                end_z, res = native(s[key], ctx, self.dt, n, self.groups)
                if mixing:
                    mixed, memory = _check_mix(memory, s[key], end_z, res, member, self.reg, self.restart)
                end = {key: end_z}
            elif mixing:
                args = (g_field, s, ctx, self.dt, n, self.groups, tuple(layout.names), memory, member,
                        self.reg, self.restart)
                end, res, mixed, memory = self._run(_euler_steps_mixed, *args)
            else:
                end, res = self._run(_euler_steps, g_field, s, ctx, self.dt, n, self.groups)
            step += n
            r = self._check(layout, res, end, step)
            trace.append(r)
            # A sample that stops keeps the end of its run; the others go on from the mix.
            finished, keep = frozen.freeze(frozen.check(res, self.tol, step), end)
            s = end
            if finished:
                break
            if mixing:
                s = layout.unpack(mixed)
            if keep is not None:
                s, ctx = _subset(s, keep), _subset(ctx, keep)
                if memory is not None:
                    memory = memory.subset(keep)
        return self._finish(layout, frozen.result(s), frozen.stats(step, self.tol, trace), g_field, context)


class Anderson(Solver):
    """Anderson acceleration of the fixed-point map ``T(s) = s + dt · g(s)``, batched.

    Keeps the last ``memory`` iterates, mixes them with weights that minimise
    the norm of the combined residual (sum-to-one constraint, Tikhonov
    regularisation ``reg`` relative to the Gram matrix's scale, solved in
    float64). With ``groups``, that norm weighs each group by ``1/‖s_g‖``, the
    norm the stopping rule reads: a small population (a control beside a large
    state) is not left out of the least squares. A sample whose small linear
    system is singular takes a plain step instead (counted in
    ``stats.fallbacks``). Safeguard: a sample whose residual grows above
    ``restart`` times its best one restarts from its best iterate with an empty
    memory (``stats.restarts``). Each sample returns its best iterate; with
    ``freeze=True`` (and a ``context``) converged samples leave the batch as in
    :class:`Euler`.

    ``warmup`` plain Euler steps come first (checked every ``check_every``, converged samples
    frozen, no memory kept), so the many samples that settle quickly pay Euler's price
    and only the slow ones are accelerated. For dynamics whose Euler iterates
    circle an equilibrium without reaching it (LCP-DI's controlled dynamics on a
    sample whose linearisation has Euler eigenvalues just outside the unit circle),
    the accelerated phase still finds the fixed point.

    Args:
        memory: number of past iterates mixed (m).
        mixing: damping β of the update ``Σ α_j (s_j + β·dt·g_j)``.
        reg: regularisation of the least-squares system.
        restart: residual growth factor that triggers a restart (``inf``: never).
        start_below: a sample accelerates only while its residual is below this (far from a
            fixed point the plain dynamics choose the basin); ``inf``: always.
        warmup: number of plain Euler steps before the acceleration starts.
        freeze: drop converged samples from the batch.
    """

    name = "anderson"

    def __init__(self, dt: float = 1.0, tol: float = 1e-6, max_iter: int = 800, *,
                 memory: int = 5, mixing: float = 1.0, reg: float = 1e-8, restart: float = 10.0,
                 start_below: float = 1e-2, warmup: int = 0, freeze: bool = True, **kwargs):
        super().__init__(dt, tol, max_iter, **kwargs)
        if not (isinstance(memory, int) and memory >= 1):
            raise ConfigError(f"memory must be a positive integer, got {memory!r}")
        if not (0 < mixing <= 1):
            raise ConfigError(f"mixing must be in (0, 1], got {mixing!r}")
        if not restart > 1:
            raise ConfigError(f"restart must be > 1, got {restart!r}")
        if not start_below > 0:
            raise ConfigError(f"start_below must be > 0, got {start_below!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
        self.memory, self.mixing, self.reg = memory, float(mixing), float(reg)
        self.restart, self.start_below, self.freeze = float(restart), float(start_below), bool(freeze)
        self.warmup = warmup

    def solve(self, field: Field, state0, context: Dict[str, torch.Tensor] | None = None,
              labels: Dict[str, list] | None = None) -> SolveResult:
        layout, g_field, z, frozen = self._start(field, state0, context, labels)
        B, N = z.shape
        m = self.memory
        X = z.new_zeros(B, m, N)   # past iterates
        # Their steps dt·g, kept in float64 with their Gram matrix: each step adds one row of inner
        # products (one pass over the memory) instead of recomputing and converting the whole of it.
        # With groups the weights 1/‖s_g‖ move, so the (small) Gram matrix is recomputed per step.
        G = z.new_zeros(B, m, N, dtype=torch.float64)
        gram = z.new_zeros(B, m, m, dtype=torch.float64)
        valid = torch.zeros(B, m, dtype=torch.bool, device=z.device)
        best_z, best_r = z.clone(), z.new_full((B,), math.inf, dtype=torch.float64)
        widths = layout.flat_groups
        group_of = _group_index(widths, z.device)
        ctx = context
        trace: List[float] = []
        # Counted on the device; read once at the end (no sync per step).
        fallbacks = torch.zeros((), dtype=torch.int64, device=z.device)
        restarts = torch.zeros((), dtype=torch.int64, device=z.device)
        step = 0
        for step in range(1, self.max_iter + 1):
            gz = self.dt * layout.pack(g_field(layout.unpack(z), ctx))
            warming = step <= self.warmup
            # Warm-up steps are plain Euler, as cheap as Euler's own: residuals only at the checks.
            if not warming or step % self.check_every == 0 or step == self.max_iter:
                res, best_z, best_r, stop, keep = self._track(layout, frozen, trace, step, z, gz, best_z, best_r)
                if stop:
                    break
                if keep is not None:
                    z, gz, res, X, G, valid = z[keep], gz[keep], res[keep], X[keep], G[keep], valid[keep]
                    gram, best_z, best_r, ctx = gram[keep], best_z[keep], best_r[keep], _subset(ctx, keep)
            if warming:
                z = z + gz
                continue
            slot = (step - 1) % m
            X[:, slot], G[:, slot] = z, gz
            if group_of is None:
                row = torch.bmm(G, G[:, slot, :, None]).squeeze(-1)
                gram[:, slot, :], gram[:, :, slot] = row, row
            else:
                Gw = G * _group_weights(z, widths, group_of)[:, None, :]
                gram = torch.bmm(Gw, Gw.transpose(1, 2))
            valid[:, slot] = True
            alpha, ok = _anderson_weights(gram, valid, self.reg)
            mixed = (torch.bmm(alpha[:, None, :].to(z.dtype), X)
                     + self.mixing * torch.bmm(alpha[:, None, :], G).to(z.dtype)).squeeze(1)
            z = torch.where(ok[:, None], mixed, z + self.mixing * gz)
            fallbacks += (~ok).sum()
            # Safeguard: a sample whose residual grew far above its best restarts from its best iterate.
            blown = res > self.restart * best_r
            restarts += blown.sum()
            z = torch.where(blown[:, None], best_z, z)
            # Far from a fixed point the plain dynamics choose the basin; acceleration starts near it.
            valid = valid & ~(blown | (res > self.start_below))[:, None]
        final = frozen.result({"z": best_z})["z"]
        stats = frozen.stats(step, self.tol, trace, int(fallbacks), int(restarts))
        return self._finish(layout, layout.unpack(final), stats, g_field, context)


class Broyden(Solver):
    """Limited-memory ("good") Broyden's method for the root of ``g(s) = dt · field(s)``, batched.

    Keeps a per-sample low-rank approximation of the inverse Jacobian,
    ``J⁻¹ ≈ −I + Σ_i u_i v_iᵀ`` (starting from ``−I``: the Jacobian of
    ``T(s) − s`` for a weakly coupled map ``T``), steps ``s ← s − J⁻¹ g(s)`` and
    updates it with the secant pair ``(Δs, Δg)`` of the step. When the memory of
    ``memory`` pairs is full it restarts from ``−I``. A sample whose secant
    update is degenerate (``Δsᵀ J⁻¹ Δg ≈ 0``) skips it (``stats.fallbacks``); a
    sample whose residual grows above ``restart`` times its best returns to its
    best iterate with an empty memory (``stats.restarts``). Each sample returns
    its best iterate; converged samples freeze as in :class:`Euler`.

    Args:
        memory: number of secant pairs kept.
        restart: residual growth factor that triggers a restart.
        freeze: drop converged samples from the batch.

    >>> res = Broyden(tol=1e-10, max_iter=50).solve(lambda s: {"x": 0.5 * torch.cos(s["x"]) - s["x"]},
    ...                                            {"x": torch.zeros(3, 2)})
    >>> bool(res.stats.converged), res.stats.iterations < 20
    (True, True)
    """

    name = "broyden"

    def __init__(self, dt: float = 1.0, tol: float = 1e-6, max_iter: int = 800, *,
                 memory: int = 20, restart: float = 10.0, freeze: bool = True, **kwargs):
        super().__init__(dt, tol, max_iter, **kwargs)
        if not (isinstance(memory, int) and memory >= 1):
            raise ConfigError(f"memory must be a positive integer, got {memory!r}")
        if not restart > 1:
            raise ConfigError(f"restart must be > 1, got {restart!r}")
        self.memory, self.restart, self.freeze = memory, float(restart), bool(freeze)

    @staticmethod
    def _apply(U, V, n, x):
        """``J⁻¹ x = −x + Σ_{i<n} u_i (v_iᵀ x)`` per sample; U, V ``(B, m, N)``, n ``(B,)`` pairs in use.

        ``_apply(V, U, n, x)`` is the transpose, ``J⁻ᵀ x``.
        """
        used = (torch.arange(U.shape[1], device=U.device)[None, :] < n[:, None]).to(x.dtype)
        return -x + torch.einsum("bm,bmn->bn", used * torch.einsum("bmn,bn->bm", V, x), U)

    def solve(self, field: Field, state0, context: Dict[str, torch.Tensor] | None = None,
              labels: Dict[str, list] | None = None) -> SolveResult:
        layout, g_field, z, frozen = self._start(field, state0, context, labels)
        B, N = z.shape
        U, V = z.new_zeros(B, self.memory, N), z.new_zeros(B, self.memory, N)
        n = torch.zeros(B, dtype=torch.long, device=z.device)
        best_z, best_r = z.clone(), z.new_full((B,), math.inf, dtype=torch.float64)
        ctx = context
        trace: List[float] = []
        fallbacks = torch.zeros((), dtype=torch.int64, device=z.device)
        restarts = torch.zeros((), dtype=torch.int64, device=z.device)
        gz = self.dt * layout.pack(g_field(layout.unpack(z), ctx))
        step = 0
        for step in range(1, self.max_iter + 1):
            res, best_z, best_r, stop, keep = self._track(layout, frozen, trace, step, z, gz, best_z, best_r)
            if stop:
                break
            if keep is not None:
                z, gz, res, U, V, n = z[keep], gz[keep], res[keep], U[keep], V[keep], n[keep]
                best_z, best_r, ctx = best_z[keep], best_r[keep], _subset(ctx, keep)
            # Safeguard: a sample far above its best restarts there with an empty memory.
            blown = res > self.restart * best_r
            restarts += blown.sum()
            if bool(blown.any()):
                z = torch.where(blown[:, None], best_z, z)
                n = torch.where(blown, 0, n)
                gz = self.dt * layout.pack(g_field(layout.unpack(z), ctx))
            dz = -self._apply(U, V, n, gz)
            z_new = z + dz
            g_new = self.dt * layout.pack(g_field(layout.unpack(z_new), ctx))
            dg = g_new - gz
            jdg = self._apply(U, V, n, dg)
            v = self._apply(V, U, n, dz)
            den = (dz * jdg).sum(1, keepdim=True)
            ok = den.abs().squeeze(1) > 1e-12 * (dz.norm(dim=1) * jdg.norm(dim=1)).clamp_min(_TINY)
            fallbacks += (~ok).sum()
            n = torch.where(n >= self.memory, 0, n)  # full memory: restart from −I
            u = (dz - jdg) / torch.where(ok[:, None], den, torch.ones_like(den))
            slot = n.clamp_max(self.memory - 1)
            rows = torch.arange(z.shape[0], device=z.device)
            U[rows, slot] = torch.where(ok[:, None], u, U[rows, slot])
            V[rows, slot] = torch.where(ok[:, None], v, V[rows, slot])
            n = n + ok.long()
            z, gz = z_new, g_new
        final = frozen.result({"z": best_z})["z"]
        stats = frozen.stats(step, self.tol, trace, int(fallbacks), int(restarts))
        return self._finish(layout, layout.unpack(final), stats, g_field, context)


SOLVERS: Registry[Solver] = Registry("solver")
SOLVERS.register("euler", Euler)
SOLVERS.register("anderson", Anderson)
SOLVERS.register("broyden", Broyden)


def get_solver(name: str, **kwargs) -> Solver:
    """Build a registered solver (``euler``, ``anderson``, ``broyden``) with its settings."""
    return SOLVERS.create(name, **kwargs)
