"""Learning rules behind one interface: ``out = method(system, x, y)``.

Built-ins: ``bp`` (backprop through the layered forward pass), ``bptt``
(backprop through ``max_iter`` unrolled steps), ``rbp``
(recurrent backprop / implicit differentiation), ``lcp-di`` (least control
with dynamic inversion), ``lcp-kp`` (dynamic inversion through learned
Kolen-Pollack feedback weights), ``lcp-lf`` (learned linear feedback), ``lcp-ebd`` (least control by energy minimisation). Add your own with :func:`register_method`.
"""
from __future__ import annotations

from typing import Callable

from ..registry import Registry
from .base import EquilibriumMethod, Method, MethodOutput, accumulate_grads
from .baselines import BP, BPTT, RBP
from .ebd import LCPEBD
from .kp import LCPKP
from .lcp import LCPDI, ControlledEquilibrium, local_update
from .lf import LCPLF

METHODS: Registry[Method] = Registry("method")
METHODS.register("bp", BP)
METHODS.register("bptt", BPTT)
METHODS.register("rbp", RBP)
METHODS.register("lcp-di", LCPDI)
METHODS.register("lcp-ebd", LCPEBD)
METHODS.register("lcp-kp", LCPKP)
METHODS.register("lcp-lf", LCPLF)


def register_method(name: str, factory: Callable[..., Method], *, overwrite: bool = False):
    """Make ``factory(**settings)`` available as ``get_method(name, ...)`` and ``--method name``."""
    return METHODS.register(name, factory, overwrite=overwrite)


def get_method(name: str, **settings) -> Method:
    """Build a method by name; unknown names raise ``ValueError`` listing the valid ones.

    >>> get_method("lcp-di", alpha=0.1, k_i=1.0).beta
    10.0
    """
    return METHODS.create(name, **settings)


__all__ = ["Method", "EquilibriumMethod", "MethodOutput", "accumulate_grads", "BP", "BPTT", "RBP", "LCPDI", "LCPEBD", "LCPKP", "LCPLF",
           "ControlledEquilibrium", "local_update", "METHODS", "register_method", "get_method"]
