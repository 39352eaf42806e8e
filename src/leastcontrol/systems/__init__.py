"""Equilibrium systems: state, dynamics ``f``, readout."""
import inspect
import numbers
from dataclasses import dataclass
from typing import Sequence

from ..config import check_number
from ..errors import ConfigError
from ..registry import Registry
from .base import EquilibriumSystem, State
from .conv import DEQ, ConvFeedforwardEquilibrium
from .hopfield import HopfieldEquilibrium
from .networks import FeedforwardEquilibrium, RecurrentEquilibrium

SYSTEMS: Registry[EquilibriumSystem] = Registry("model")


def hidden_layers(hidden, model: str) -> list:
    """The hidden widths of a layered model from its ``hidden`` option: an int ``n`` is two layers of
    ``n`` units (the published layout), a list or tuple of ints is those layers, bottom first.

    Raises:
        ConfigError: anything else (a bool, a float, an empty list, a width below 1).
    """
    if isinstance(hidden, (list, tuple)):
        widths = list(hidden)
    else:
        widths = [hidden, hidden]
    if not widths or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ConfigError(f"hidden of the {model} model must be a positive integer (two layers of that width) "
                          f"or a non-empty list of positive integers (one per layer), got {hidden!r}")
    return [int(w) for w in widths]


SYSTEMS.register("ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 FeedforwardEquilibrium([n_in, *hidden_layers(hidden, "ff"), n_out], **kw))
SYSTEMS.register("rnn", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 RecurrentEquilibrium(n_in, hidden, n_out, **kw))
SYSTEMS.register("conv-ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 ConvFeedforwardEquilibrium(input_shape, n_out, **kw))
SYSTEMS.register("deq", lambda n_in, n_out, hidden=256, input_shape=None, **kw: DEQ(input_shape, n_out, **kw))
# Energy-based (equilibrium propagation): the ff layout with symmetric coupling, hard sigmoid rates;
# "hopfield-readout" reads the top hidden layer linearly (for a cross-entropy cost).
SYSTEMS.register("hopfield", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 HopfieldEquilibrium([n_in, *hidden_layers(hidden, "hopfield"), n_out], **kw))
SYSTEMS.register("hopfield-readout", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 HopfieldEquilibrium([n_in, *hidden_layers(hidden, "hopfield-readout"), n_out], readout="linear",
                                     **kw))


def register_system(name: str, factory=None, *, overwrite: bool = False):
    """Make a system available by name (``--model name``, ``[model] name``).

    ``factory(n_in, n_out, **options)`` builds it; it receives those of ``hidden``, ``input_shape``
    (per-sample shape of the data) and ``generator`` (of the initialisation) that it accepts.
    Usable as a decorator on a class whose ``__init__`` takes ``(n_in, n_out, ...)``.
    """
    if factory is None:
        return lambda f: register_system(name, f, overwrite=overwrite)
    SYSTEMS.register(name, factory, overwrite=overwrite)
    return factory


def get_system(name: str, n_in: int, n_out: int, hidden: "int | Sequence[int]" = 256, input_shape=None, **kwargs) -> EquilibriumSystem:
    """Build a registered system by name.

    ``ff``: 784-256-256-10 layout; ``hidden`` an int (two layers of that width) or a list of ints
    (those layers), and the options of :class:`FeedforwardEquilibrium` (``activation``, ``state``);
    ``hopfield``, ``hopfield-readout``: the same layouts; ``rnn``: 256 recurrent units; ``conv-ff`` and
    ``deq``: convolutional, sized from ``input_shape`` ``(C, H, W)`` (``hidden`` is not used). A factory
    gets the options its signature accepts.

    >>> get_system("ff", 784, 10, hidden=[128, 128, 128], activation="gelu", state="rate").sizes
    [784, 128, 128, 128, 10]
    """
    factory = SYSTEMS.factory(name)
    options = dict(hidden=hidden, input_shape=input_shape, **kwargs)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(n_in, n_out, **options)


@dataclass
class ModelConfig:
    """The ``[model]`` section of a run.

    Args:
        name: a registered system (``ff``, ``rnn``, ``conv-ff``, ``deq``, or a user's).
        hidden: hidden units (per layer for ``ff``); the conv systems are sized from the images.
        recurrent_bias: ``rnn`` only: give ``W φ(v)`` its own bias besides the input's, as the
            paper's research code does (the published configs turn it on).
    """

    name: str = "rnn"
    hidden: int = 256
    recurrent_bias: bool = False

    def __post_init__(self):
        SYSTEMS.factory(self.name)   # an unknown name raises, listing the valid ones
        check_number("model.hidden", self.hidden, low=1, strict=False, integer=True)
        if self.recurrent_bias and self.name != "rnn":
            raise ConfigError(f"model.recurrent_bias is an option of the rnn model, not of '{self.name}'")

    def build(self, n_in: int, n_out: int, input_shape=None, generator=None) -> EquilibriumSystem:
        """The system, sized for the data, initialised from ``generator``."""
        extra = {"recurrent_bias": True} if self.recurrent_bias else {}
        return get_system(self.name, n_in, n_out, hidden=self.hidden, input_shape=input_shape, generator=generator,
                          **extra)


__all__ = ["ModelConfig", "register_system", "EquilibriumSystem", "State", "FeedforwardEquilibrium", "RecurrentEquilibrium", "ConvFeedforwardEquilibrium",
           "DEQ", "SYSTEMS", "get_system", "HopfieldEquilibrium"]
