"""Equilibrium systems: state, dynamics ``f``, readout."""
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

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


def _hopfield(name: str, readout: str):
    def build(n_in, n_out, hidden=256, input_shape=None, activation=None, init=None, **kw):
        return HopfieldEquilibrium([n_in, *hidden_layers(hidden, name), n_out], rate=activation or "hard_sigmoid",
                                   readout=readout, init=init, **kw)
    return build


SYSTEMS.register("ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 FeedforwardEquilibrium([n_in, *hidden_layers(hidden, "ff"), n_out], **kw))
SYSTEMS.register("rnn", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 RecurrentEquilibrium(n_in, hidden, n_out, **kw))
SYSTEMS.register("conv-ff", lambda n_in, n_out, hidden=256, input_shape=None, **kw:
                 ConvFeedforwardEquilibrium(input_shape, n_out, **kw))
SYSTEMS.register("deq", lambda n_in, n_out, hidden=256, input_shape=None, **kw: DEQ(input_shape, n_out, **kw))
# Energy-based (equilibrium propagation): the ff layout with symmetric coupling, hard sigmoid rates;
# "hopfield-readout" reads the top hidden layer linearly (for a cross-entropy cost).
SYSTEMS.register("hopfield", _hopfield("hopfield", "layer"))
SYSTEMS.register("hopfield-readout", _hopfield("hopfield-readout", "linear"))
_BUILTIN = ("ff", "rnn", "conv-ff", "deq", "hopfield", "hopfield-readout")


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


# The options of the built-in systems beyond ``hidden``: option -> the models that take it.
_MODEL_OPTIONS = {
    "recurrent_bias": ("rnn",),
    "activation": ("ff", "hopfield", "hopfield-readout"),
    "state": ("ff",),
    "init": ("hopfield", "hopfield-readout"),
}
_LAYERED = ("ff", "hopfield", "hopfield-readout")


@dataclass
class ModelConfig:
    """The ``[model]`` section of a run.

    Args:
        name: a registered system (``ff``, ``rnn``, ``conv-ff``, ``deq``, ``hopfield``,
            ``hopfield-readout``, or a user's).
        hidden: hidden units: for ``rnn`` its width; for the layered systems (``ff``, ``hopfield``,
            ``hopfield-readout``) the width of each of their two hidden layers, or a list of the hidden
            layers' widths (``[500]``, ``[128, 128, 128]``); the conv systems are sized from the images.
        recurrent_bias: ``rnn`` only: give ``W φ(v)`` its own bias besides the input's, as the
            paper's research code does (the published configs turn it on).
        activation: the rate function of ``ff`` (``tanh`` when unset) or ``hopfield`` (its ρ,
            ``hard_sigmoid`` when unset); see the systems for the choices.
        state: ``ff`` only: ``potential`` (the hidden state holds pre-activations, the default) or
            ``rate`` (it holds the rates, so predictive coding's errors are on rates, as in pcx).
        init: ``hopfield`` only: ``glorot`` (weights U(±√(6/(fan_in + fan_out))), biases 0, as
            Scellier & Bengio 2017) instead of PyTorch's linear-layer draw.
    """

    name: str = "rnn"
    hidden: Union[int, List[int]] = 256
    recurrent_bias: bool = False
    activation: Optional[str] = None
    state: Optional[str] = None
    init: Optional[str] = None

    def __post_init__(self):
        SYSTEMS.factory(self.name)   # an unknown name raises, listing the valid ones
        if isinstance(self.hidden, (list, tuple)):
            if self.name not in _LAYERED:
                raise ConfigError(f"model.hidden as a list of layer widths is for the layered systems "
                                  f"({', '.join(_LAYERED)}); give '{self.name}' one number")
            if not self.hidden:
                raise ConfigError("model.hidden must list at least one hidden layer's width, e.g. [256, 256]")
            for i, width in enumerate(self.hidden):
                check_number(f"model.hidden[{i}]", width, low=1, strict=False, integer=True)
            self.hidden = [int(w) for w in self.hidden]
        else:
            check_number("model.hidden", self.hidden, low=1, strict=False, integer=True)
        for key, models in _MODEL_OPTIONS.items():
            value = getattr(self, key)
            if value not in (None, False) and self.name in _BUILTIN and self.name not in models:
                raise ConfigError(f"model.{key} is an option of {' and '.join(models)}, not of '{self.name}'")
        if self.init is not None and self.init != "glorot":
            raise ConfigError(f"unknown model.init {self.init!r}; valid: glorot (leave it out for PyTorch's draw)")

    def options(self) -> Dict[str, Any]:
        """The system's constructor options that are set (``hidden`` aside)."""
        return {k: v for k in _MODEL_OPTIONS if (v := getattr(self, k)) not in (None, False)}

    def build(self, n_in: int, n_out: int, input_shape=None, generator=None) -> EquilibriumSystem:
        """The system, sized for the data, initialised from ``generator``."""
        return get_system(self.name, n_in, n_out, hidden=self.hidden, input_shape=input_shape, generator=generator,
                          **self.options())


__all__ = ["ModelConfig", "register_system", "EquilibriumSystem", "State", "FeedforwardEquilibrium", "RecurrentEquilibrium", "ConvFeedforwardEquilibrium",
           "DEQ", "SYSTEMS", "get_system", "HopfieldEquilibrium"]
