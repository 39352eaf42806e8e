"""Equilibrium systems: state, dynamics ``f``, readout."""
from ..registry import Registry
from .base import EquilibriumSystem, State
from .networks import FeedforwardEquilibrium, RecurrentEquilibrium

SYSTEMS: Registry[EquilibriumSystem] = Registry("model")
SYSTEMS.register("ff", lambda n_in, n_out, hidden=256, **kw: FeedforwardEquilibrium([n_in, hidden, hidden, n_out], **kw))
SYSTEMS.register("rnn", lambda n_in, n_out, hidden=256, **kw: RecurrentEquilibrium(n_in, hidden, n_out, **kw))


def get_system(name: str, n_in: int, n_out: int, hidden: int = 256, **kwargs) -> EquilibriumSystem:
    """Build a registered system by name (``ff``: 784-256-256-10 layout, ``rnn``: 256 recurrent units)."""
    return SYSTEMS.create(name, n_in, n_out, hidden=hidden, **kwargs)


__all__ = ["EquilibriumSystem", "State", "FeedforwardEquilibrium", "RecurrentEquilibrium", "SYSTEMS", "get_system"]
