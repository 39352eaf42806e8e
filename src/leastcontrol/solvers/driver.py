"""The one solver loop.

Every solve in the library runs here, whatever its step rule and backend::

    while step < max_steps:
        run the rule's steps to the next convergence check        (a backend: eager, compiled, C)
        mix the run with the last ones                              (check-level Anderson, optional)
        apply the stopping rule to each running sample              (stopping.StoppingRule)
        drop the samples that stopped, keep their outcome           (stopping.Tracker)

The result carries each sample's status code (converged, stalled, max_steps, diverged).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..errors import ConfigError
from .backends import pick
from .field import Field, Layout, check_groups
from .mixing import MixMemory, check_mix, group_members
from .result import SolveResult
from .stability import flat_radius, warn_unstable
from .stopping import Tracker


def _check_context(context, batch: int) -> None:
    if context is None:
        return
    if not isinstance(context, dict):
        raise ConfigError(f"context must be a dict of batch-first tensors, got {type(context).__name__}")
    for key, value in context.items():
        if not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch):
            raise ConfigError(f"context '{key}' must be a tensor with the state's batch size {batch} first "
                              "(bind other data into the field instead)")


def _subset(context: Dict[str, torch.Tensor] | None, keep: torch.Tensor):
    return None if context is None else {k: v[keep] for k, v in context.items()}


def solve(solver, field, state0, context: Dict[str, torch.Tensor] | None = None, *, groups=None,
          throw: bool = True) -> SolveResult:
    """Settle ``field`` from ``state0`` with ``solver``; see :meth:`~leastcontrol.solvers.Solver.solve`."""
    if isinstance(field, Field):
        if not (isinstance(state0, torch.Tensor) and state0.dim() == 2):
            raise ConfigError("a Field steps one flat (batch, width) tensor; pass the state packed that way")
        layout, z = None, state0
    else:
        layout = Layout(state0)
        field, z = layout.field(field, context is not None), layout.flat0
    _check_context(context, z.shape[0])
    populations = field.populations or {"state": z.shape[1]}
    if groups == "populations":
        groups = tuple(populations.values())
    groups = check_groups(groups, z.shape[1])
    for backend in solver._backends:
        if not backend.available(field, groups) and not backend.gave_way():
            raise ConfigError(f"backend '{backend.name}' has no steps for this field (populations "
                              f"{', '.join(populations)}); drop it from the solver's backend")

    with torch.no_grad():   # a solve records no autograd graph (a method differentiates the equilibrium)
        final, stats = _loop(solver, field, z, context, groups, throw)
    if solver.check_stability:
        stats.sample_radius = flat_radius(field, final, context, solver.dt).cpu()
        warn_unstable(stats.sample_radius, solver.name)
    return SolveResult(final if layout is None else layout.unpack(final), stats)


def _loop(solver, field: Field, z: torch.Tensor, context, groups, throw: bool):
    max_steps, every, mix = solver.max_steps, solver.check_every, solver.mix
    tracker = Tracker(z, solver.freeze and context is not None, solver.stopping_rule())
    carry = solver.init(field.fn, z, context)
    memory = member = None   # of the check-level mix, from its first mixing check on
    trace: List[float] = []
    ctx, step = context, 0
    while True:
        # Run to the next convergence check (every check_every steps, and at max_steps).
        n = min(every - step % every, max_steps - step)
        backend = pick(solver._backends, solver, field, z.shape[0], groups)
        start = z
        end, res, carry = backend.advance(solver, field, z, ctx, carry, n, step, groups)
        step += n
        mixing = mix is not None and mix.after <= step < max_steps
        if mixing:
            if memory is None:
                member = group_members(groups, z.shape[1], z.device)
                memory = MixMemory.empty(start, mix, member.shape[1])
            mixed, memory = backend.run(check_mix, memory, start, end, res, member, mix.reg, mix.restart)
        outcome = solver.outcome(end, carry)
        trace.append(float(res.max()))
        finished, keep = tracker.check(res, step, outcome, lambda: solver.diverged_state(end, carry), field, throw,
                                       solver.name)
        # A sample that stops keeps its outcome; the others go on from the mix.
        z = mixed if mixing else end
        if keep is not None:
            z, outcome, ctx, carry = z[keep], outcome[keep], _subset(ctx, keep), solver.subset(carry, keep)
            if memory is not None:
                memory = memory.subset(keep)
        if finished or step >= max_steps:
            break
    return tracker.finish(outcome), tracker.stats(step, trace, solver.totals(carry))
