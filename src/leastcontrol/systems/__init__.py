"""Equilibrium systems: state, dynamics ``f``, readout."""
from ..registry import Registry
from .base import EquilibriumSystem, State
from .conv import DEQ, ConvFeedforwardEquilibrium
from .networks import FeedforwardEquilibrium, RecurrentEquilibrium

SYSTEMS: Registry[EquilibriumSystem] = Registry("model")
SYSTEMS.register("ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 FeedforwardEquilibrium([n_in, hidden, hidden, n_out], **kw))
SYSTEMS.register("rnn", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 RecurrentEquilibrium(n_in, hidden, n_out, **kw))
SYSTEMS.register("conv-ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 ConvFeedforwardEquilibrium(input_shape, n_out, **kw))
SYSTEMS.register("deq", lambda n_in, n_out, hidden=256, input_shape=None, **kw: DEQ(input_shape, n_out, **kw))


def get_system(name: str, n_in: int, n_out: int, hidden: int = 256, input_shape=None, **kwargs) -> EquilibriumSystem:
    """Build a registered system by name.

    ``ff``: 784-256-256-10 layout; ``rnn``: 256 recurrent units; ``conv-ff`` and ``deq``:
    convolutional, sized from ``input_shape`` ``(C, H, W)`` (``hidden`` is not used).
    """
    return SYSTEMS.create(name, n_in, n_out, hidden=hidden, input_shape=input_shape, **kwargs)


__all__ = ["EquilibriumSystem", "State", "FeedforwardEquilibrium", "RecurrentEquilibrium", "ConvFeedforwardEquilibrium",
           "DEQ", "SYSTEMS", "get_system"]
