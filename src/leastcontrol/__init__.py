"""leastcontrol: learning equilibrium systems with the least-control principle.

Meulemans, Zucchet, Kobayashi, von Oswald, Sacramento, "The least-control
principle for local learning at equilibrium", NeurIPS 2022.
"""
from .errors import (CheckpointError, ConfigError, DataFormatError, DatasetNotFoundError,
                     LeastControlError, SolverDivergedError, UnstableEquilibriumWarning)
from .methods import (BP, BPTT, LCPDI, LCPEBD, LCPKP, LCPLF, RBP, Method, MethodOutput, get_method, local_update,
                      register_method)
from .solvers import (Adam, Anderson, Broyden, CheckMix, Euler, Field, SolveResult, SolveStats, Solver, Status,
                      euler_map_radius, get_solver, register_solver)
from .systems import EquilibriumSystem, FeedforwardEquilibrium, RecurrentEquilibrium, get_system, register_system

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataFormatError", "DatasetNotFoundError", "LeastControlError",
    "SolverDivergedError", "UnstableEquilibriumWarning", "BP", "BPTT", "RBP", "LCPDI", "LCPKP", "LCPLF", "LCPEBD", "Method", "MethodOutput",
    "get_method", "local_update", "register_method", "Solver", "Euler", "Anderson", "Broyden", "Adam", "CheckMix",
    "Field", "SolveResult", "SolveStats", "Status", "register_solver",
    "euler_map_radius", "get_solver", "register_system", "EquilibriumSystem", "FeedforwardEquilibrium", "RecurrentEquilibrium", "get_system",
]
