"""Learning rules behind one interface: ``out = method(system, x, y)``.

Built-ins: ``bp`` (backprop through the layered forward pass), ``bptt``
(backprop through ``max_iter`` unrolled steps), ``rbp``
(recurrent backprop / implicit differentiation), ``lcp-di`` (least control
with dynamic inversion), ``lcp-kp`` (dynamic inversion through learned
Kolen-Pollack feedback weights), ``lcp-lf`` (learned linear feedback), ``lcp-ebd`` (least control by energy minimisation). Add your own with :func:`register_method`.
On energy-based systems: ``ep`` and ``ep-centered`` (equilibrium propagation, one-sided and centered);
on layered systems: ``pc`` and ``ipc`` (predictive coding, and its incremental form).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ..config import check_table, merge
from ..errors import ConfigError
from ..registry import Registry
from .base import EquilibriumMethod, Method, MethodOutput, accumulate_grads, phase_stats
from .baselines import BP, BPTT, RBP
from .ebd import LCPEBD
from .ep import EP, EPCentered
from .kp import LCPKP
from .lcp import LCPDI, ControlledEquilibrium, local_update
from .lf import LCPLF
from .pc import IPC, PC

METHODS: Registry[Method] = Registry("method")
METHODS.register("bp", BP)
METHODS.register("bptt", BPTT)
METHODS.register("rbp", RBP)
METHODS.register("lcp-di", LCPDI)
METHODS.register("lcp-ebd", LCPEBD)
METHODS.register("lcp-kp", LCPKP)
METHODS.register("lcp-lf", LCPLF)
METHODS.register("ep", EP)
METHODS.register("ep-centered", EPCentered)
METHODS.register("pc", PC)
METHODS.register("ipc", IPC)


def register_method(name: str, factory: Callable[..., Method] | None = None, *, overwrite: bool = False):
    """Make ``factory(**settings)`` available as ``get_method(name, ...)``, ``--method name`` and
    ``[method] name``; usable as a class decorator. A dataclass method's settings are checked key by
    key when built from a config table."""
    if factory is None:
        return lambda f: register_method(name, f, overwrite=overwrite)
    if isinstance(factory, type) and issubclass(factory, Method):
        factory.name = name
    METHODS.register(name, factory, overwrite=overwrite)
    return factory


def get_method(name: str, **settings) -> Method:
    """Build a method by name; unknown names raise ``ValueError`` listing the valid ones.

    >>> get_method("lcp-di", alpha=0.1, k_i=1.0).beta
    10.0
    """
    return METHODS.create(name, **settings)


def method_from_dict(table: Mapping[str, Any], *, model: str | None = None, dataset: str | None = None,
                     where: str = "method") -> Method:
    """A method from a config table: ``name`` and its settings (solvers as tables), over the method's
    defaults for ``model`` and then for ``(model, dataset)`` (``Method.model_defaults``).

    Raises:
        ConfigError: an unknown method, key or solver setting, or a wrongly typed value, naming it and
            the valid ones.
    """
    settings = dict(table)
    name = settings.pop("name", "lcp-di")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where}.name: unknown method {name!r}; valid methods: {', '.join(METHODS.names())}")
    cls = METHODS.factory(name)
    defaults = getattr(cls, "model_defaults", {})
    if model is not None:
        settings = merge(merge(dict(defaults.get(model, {})), defaults.get((model, dataset), {})), settings)
    if dataclasses.is_dataclass(cls):
        own = {f.name for f in dataclasses.fields(cls)}
        for key in settings:
            users = [m for m in METHODS.names() if m != name and dataclasses.is_dataclass(METHODS.factory(m))
                     and key in {f.name for f in dataclasses.fields(METHODS.factory(m))}]
            if key not in own and users:   # a setting of another rule is refused, not dropped
                raise ConfigError(f"{where}.{key} is a setting of {', '.join(users)}, not of {name}; leave it out "
                                  f"(the keys of {name}: {', '.join(['name'] + sorted(own))})")
        check_table(cls, settings, where, of=f" of method '{name}'", extra=("name",))
    return cls(**settings)


__all__ = ["method_from_dict", "phase_stats", "Method", "EquilibriumMethod", "MethodOutput", "accumulate_grads", "BP", "BPTT", "RBP", "LCPDI", "LCPEBD", "LCPKP", "LCPLF",
           "ControlledEquilibrium", "local_update", "METHODS", "register_method", "get_method", "EP", "EPCentered", "PC", "IPC"]
