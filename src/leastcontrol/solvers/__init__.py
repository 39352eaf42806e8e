"""Fixed-point solvers for equilibrium dynamics ``ṡ = g(s)``: step rules run by one driver.

- a *step rule* (:class:`Euler`, :class:`Anderson`, :class:`Broyden`, or a user's, registered with
  :func:`register_solver`) says how to take a step; its settings and the driver's (``tol``,
  ``max_steps``, ``check_every``, the stall rule, freezing, the check-level :class:`CheckMix`, the
  backend) are fields of one :class:`Solver` dataclass;
- the *driver* (:mod:`~leastcontrol.solvers.driver`) owns the loop: convergence checks every k
  steps, the stopping rule, per-sample freezing, mixing, the trace;
- *backends* (:data:`BACKENDS`: eager, compile, native) run the steps between two checks;
- every solve returns a :class:`SolveResult` whose stats hold a :class:`Status` per sample
  (converged / stalled / max_steps / diverged).

>>> import torch
>>> res = Euler(tol=1e-8, max_steps=500).solve(lambda s: 0.5 * torch.cos(s) - s, torch.zeros(4, 3))
>>> res.stats.converged, res.stats.status.tolist()
(True, [0, 0, 0, 0])
"""
from .adam import Adam
from .anderson import Anderson
from .backends import BACKENDS, Backend
from .base import SOLVERS, Solver, get_solver, register_solver, solver_from_dict
from .broyden import Broyden
from .driver import solve
from .euler import Euler
from .field import Field, relative_residual
from .mixing import CheckMix
from .momentum import Momentum
from .result import SolveResult, SolveStats, Status
from .stability import UNSTABLE_RADIUS, euler_map_radius

__all__ = ["Solver", "Euler", "Anderson", "Broyden", "Adam", "Momentum", "CheckMix", "Field", "SolveResult", "SolveStats", "Status",
           "SOLVERS", "BACKENDS", "Backend", "get_solver", "register_solver", "solver_from_dict", "solve",
           "relative_residual", "euler_map_radius", "UNSTABLE_RADIUS"]
