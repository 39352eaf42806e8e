"""The training loop: optimizer, cosine schedule, evaluation, checkpoints, JSON results.

>>> from leastcontrol.train import TrainConfig, train
>>> result = train(TrainConfig(epochs=1, limit_train=128, limit_test=64, progress=False))  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import config as cfg
from .checkpoint import TRAIN_FORMAT, check_resume, load_checkpoint, resume_state  # noqa: F401 (load_checkpoint: public here)
from .data import DataConfig, Dataset
from .errors import CheckpointError, ConfigError, SolverDivergedError
from .methods import LCPDI, Method, method_from_dict
from .methods.base import EquilibriumMethod
from .presets import PRESETS, apply_preset
from .run import Run
from .systems import EquilibriumSystem, ModelConfig

# Published settings (docs/LCP.md §4 and the research code's commands): gradient clipping 10
# for the recurrent systems (RNN, DEQ); 30 epochs, 8 on the bundled digits (the default job).
DEFAULT_GRAD_CLIP = {"rnn": 10.0, "deq": 10.0}
DEFAULT_EPOCHS = {"digits": 8}


@dataclass
class LoopConfig:
    """The ``[loop]`` section of a run: the optimizer, the schedule and the batches.

    Args:
        epochs: passes over the training set (default 30; 8 on ``digits``).
        batch_size, lr, weight_decay: of the optimizer: ``adam``, ``adamw`` (decoupled weight decay,
            Loshchilov & Hutter 2019) or ``sgd`` (plain).
        schedule: ``cosine`` (per-step decay to 0.1·lr over the run), ``warmup-cosine`` (a linear
            rise from lr to ``warmup_peak``·lr over the first ``warmup`` fraction of the steps, then a
            cosine decay to 0.1·lr: optax's ``warmup_cosine_decay_schedule`` as pcx sets it) or ``none``.
        warmup, warmup_peak: of ``warmup-cosine`` only (defaults 0.1 and 1.1).
        param_lr: learning rates of single parameters, by name or shell pattern (``{"W.1" = 0.1,
            "b.*" = 0.05}``); the first matching pattern wins, the others take ``lr``. Per-layer rates
            as Scellier & Bengio 2017 set them. Every pattern must match a parameter.
        shuffle: draw a new order of the training set every epoch (else its stored order, as the
            EP research code reads it). drop_last: leave out the last, partial batch of an epoch.
        persistent_states: each training and test sample's free phase starts where its previous one
            ended (Scellier & Bengio 2017's persistent particles), for methods that take a start
            (``ep``, ``ep-centered``); the states are kept in the checkpoint.
        grad_clip: largest gradient norm per parameter group (default: 10 for the recurrent
            systems, none for the layered ones); ``0`` turns it off.
        seed: draws the weights, any feedback weights and every epoch's batch order, as the
            paper's research code draws them for the same seed.
        eval_every: test accuracy every N epochs (0: only at the end). eval_batch_size: its batches.
        device: ``cpu``, ``cuda`` or ``auto``. amp: bf16 autocast of the products (conv, DEQ).
        skip_diverged: a batch whose solve diverges makes no update (counted in the history)
            instead of stopping the run.
    """

    epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    grad_clip: Optional[float] = None
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 1000
    device: str = "cpu"
    amp: bool = False
    skip_diverged: bool = False
    warmup: float = 0.1
    warmup_peak: float = 1.1
    param_lr: Optional[Dict[str, float]] = None
    shuffle: bool = True
    drop_last: bool = False
    persistent_states: bool = False

    def __post_init__(self):
        cfg.check_choice("loop.optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        cfg.check_choice("loop.schedule", self.schedule, ("cosine", "warmup-cosine", "none"))
        if self.schedule != "warmup-cosine" and (self.warmup, self.warmup_peak) != (0.1, 1.1):
            raise ConfigError("loop.warmup and loop.warmup_peak are settings of schedule \"warmup-cosine\"; "
                              f"leave them out with schedule \"{self.schedule}\"")
        cfg.check_number("loop.warmup", self.warmup, strict=False)
        if self.warmup >= 1:
            raise ConfigError(f"loop.warmup is the fraction of the steps spent warming up; give one below 1, got {self.warmup!r}")
        cfg.check_number("loop.warmup_peak", self.warmup_peak)
        if self.param_lr is not None:
            if not isinstance(self.param_lr, Mapping):
                raise ConfigError(f"loop.param_lr must be a table of parameter name (or pattern) = learning rate, "
                                  f"got {self.param_lr!r}")
            for pattern, lr in self.param_lr.items():
                cfg.check_number(f"loop.param_lr.{pattern}", lr)
        cfg.check_choice("loop.device", self.device, ("cpu", "cuda", "auto"))
        for key in ("batch_size", "eval_batch_size"):
            cfg.check_number(f"loop.{key}", getattr(self, key), low=1, strict=False, integer=True)
        cfg.check_number("loop.epochs", self.epochs, low=1, strict=False, integer=True, none_ok=True)
        cfg.check_number("loop.eval_every", self.eval_every, strict=False, integer=True)
        cfg.check_number("loop.lr", self.lr)
        cfg.check_number("loop.weight_decay", self.weight_decay, strict=False)
        cfg.check_number("loop.grad_clip", self.grad_clip, strict=False, none_ok=True)


@dataclass
class OutputConfig:
    """The ``[output]`` section of a run: where results go.

    Args:
        json_out: write config, history and test accuracy to this JSON file.
        checkpoint: save the run here after every epoch (atomically). resume: continue it.
        progress: progress bars. log: one line per epoch (loss, accuracy, iterations, time).
    """

    json_out: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    progress: bool = True
    log: bool = True

    def __post_init__(self):
        check_resume(self.checkpoint, self.resume)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "loop": LoopConfig, "output": OutputConfig}


@dataclass
class TrainConfig:
    """Everything a training run depends on, one section per component; validated at construction.

    Sections may be given as their dataclasses or as tables (``TrainConfig(model={"name": "ff"},
    method={"name": "rbp"})``); :meth:`from_tree` reads a whole tree (a config file's) with the
    per-model method defaults, the preset and the messages that name the key. Unset defaults that
    depend on another section are resolved here: ``loop.epochs`` (8 on digits, else 30) and
    ``loop.grad_clip`` (10 for rnn and deq, else off).

    Raises:
        ConfigError: an unknown name or key, a wrongly typed or invalid value.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    method: Method = field(default_factory=LCPDI)
    data: DataConfig = field(default_factory=DataConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preset: str = "published"

    def __post_init__(self):
        for key, cls in _SECTIONS.items():
            value = getattr(self, key)
            if value is None or isinstance(value, Mapping):
                setattr(self, key, cfg.section(cls, value, key))
        if isinstance(self.method, Mapping):
            self.method = method_from_dict(self.method, model=self.model.name, dataset=self.data.name)
        if not isinstance(self.method, Method):
            raise ConfigError(f"method must be a Method or a table of its settings, got {self.method!r}")
        PRESETS.factory(self.preset)
        if self.loop.epochs is None:
            self.loop.epochs = DEFAULT_EPOCHS.get(self.data.name, 30)
        if self.loop.grad_clip is None:
            self.loop.grad_clip = DEFAULT_GRAD_CLIP.get(self.model.name, 0.0)
        if self.loop.persistent_states and not self.method.takes_start:
            raise ConfigError(f"loop.persistent_states keeps each sample's free state for its next free phase; "
                              f"{self.method.name} starts from zero every time: use it with ep or ep-centered, "
                              "or leave loop.persistent_states out")

    @classmethod
    def from_tree(cls, values: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        """A run from a tree of sections (a flat table of an earlier version is migrated), with the preset
        it names filled in for its device under the keys it sets.

        Raises:
            ConfigError: naming ``where`` and the section or key at fault.
        """
        tree = cfg.as_tree(values, where)
        unknown = sorted(set(tree) - set(cfg.SECTIONS))
        if unknown:
            raise ConfigError(f"{where}: unknown section '{unknown[0]}'; valid sections: {', '.join(cfg.SECTIONS)}")
        for key in ("model", "method", "data", "loop", "output"):
            if key in tree and not isinstance(tree[key], Mapping):
                raise ConfigError(f"{where}: '{key}' must be a table of settings ([{key}]), got {tree[key]!r}")
        preset = tree.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(f"{where}: unknown preset {preset!r}; valid presets: {', '.join(PRESETS.names())}")
            tree = apply_preset(preset, tree, resolve_device(cfg.get_path(tree, "loop.device", "cpu")).type)
        return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in tree.items()})

    def to_dict(self) -> Dict[str, Any]:
        """The run's settings as a tree of plain data (JSON, checkpoints, TOML)."""
        out = {"preset": self.preset, "model": cfg.plain(self.model),
               "method": {"name": self.method.name, **cfg.plain(self.method.config())}}
        out.update({key: cfg.plain(getattr(self, key)) for key in ("data", "loop", "output")})
        return out

    def build_method(self) -> Method:
        """A fresh copy of the configured method (no state shared with earlier runs)."""
        return method_from_dict(self.to_dict()["method"])


def resolve_tree(file_values: Mapping[str, Any] | None, overrides: Sequence[Tuple[str, Any]] = (),
                 where: str = "command line") -> Dict[str, Any]:
    """The tree of a file's values (migrated if flat) with ``--set`` style overrides (dotted paths) on top."""
    tree = cfg.as_tree(file_values or {}, where)
    for path, value in overrides:
        tree = cfg.set_path(tree, path, value)
    return tree


def config_from_mapping(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """:meth:`TrainConfig.from_tree` (kept for scripts written against the flat tables)."""
    return TrainConfig.from_tree(values, source)


def load_config_file(path: str | Path) -> Dict[str, Any]:
    """A run's settings from a TOML (``.toml``) or JSON file, as a tree of sections, checked on its own.

    Raises:
        ConfigError: missing or unparsable file, unknown section or key, wrong type; naming the file.
    """
    tree = cfg.as_tree(cfg.read_file(path), str(path))
    TrainConfig.from_tree(tree, where=str(path))
    return tree


def mixed_precision(enabled: bool, device: torch.device):
    """bf16 autocast of the dynamics' convolutions and matrix products (``--amp``), else a no-op.

    Only those products run in bf16: the state, the control and the parameter updates stay in
    the parameters' dtype (fp32), because the solvers add fp32 state to the field's output and
    :func:`~leastcontrol.methods.base.accumulate_grads` casts updates to each parameter's dtype.
    bf16 resolves about 3 decimal digits, so the relative residual of a solve has a floor near
    1e-3: pair ``loop.amp`` with a loose ``method.solver.tol`` or with ``method.solver.patience``.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but PyTorch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def _batch_solver_stats(stats: Dict[str, Any]) -> tuple:
    """(iterations, worst final residual, worst converged fraction, largest stalled fraction) of one batch."""
    residuals = [v for k, v in stats.items() if k.startswith("residual_")]
    fractions = [v for k, v in stats.items() if k.startswith("converged_fraction_")]
    stalled = [v for k, v in stats.items() if k.startswith("stalled_fraction_")]
    return (stats.get("iterations", 0), max(residuals) if residuals else None,
            min(fractions) if fractions else None, max(stalled) if stalled else None)


def build_system(config: TrainConfig, data: Dataset, generator: torch.Generator | None = None) -> EquilibriumSystem:
    """The configured system, initialised from ``generator`` (default: a fresh one seeded with the run's seed)."""
    if generator is None:
        generator = torch.Generator().manual_seed(config.loop.seed)
    return config.model.build(data.n_features, data.n_classes, data.input_shape, generator)


def _other_version(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where} was written by another version of leastcontrol ({what}); use the version "
                           "that wrote it, or train the run again with this one")


def config_from_checkpoint(state: Mapping[str, Any], path: str | Path | None = None) -> TrainConfig:
    """The settings a training checkpoint (``load_checkpoint``, from ``path``) was written with, for
    evaluation only (a checkpoint of an earlier version, with a flat config, is read too).

    Raises:
        CheckpointError: settings this version cannot read (an unknown section, key, name or value),
            naming the checkpoint and the setting.
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    values = state.get("config")
    if not isinstance(values, Mapping):
        raise _other_version(where, "its 'config' is not a table of settings")
    try:
        tree = cfg.as_tree(values, f"{where} config")
        tree["output"] = {"progress": False}
        tree.pop("preset", None)   # its settings are in the tree already
        return TrainConfig.from_tree(tree, f"{where} config")
    except (ValueError, TypeError) as exc:   # ConfigError, or an unknown name from a registry
        raise _other_version(where, f"its settings do not fit this version: {exc}") from None


def _shapes(module: torch.nn.Module) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _data_dims(config: TrainConfig, data: Dataset) -> Tuple[Dict[str, set], Dict[str, set]]:
    """Per parameter of the configured system for ``data``, the dimensions that follow the data's input
    shape and those that follow its number of classes (found by building it for other ones)."""
    def shapes(n_out, input_shape):
        system = config.model.build(math.prod(input_shape), n_out, input_shape, torch.Generator().manual_seed(0))
        config.build_method().prepare(system, torch.Generator().manual_seed(0))
        return _shapes(system)

    shape = tuple(data.input_shape)
    other = (shape[0] + 1, *(2 * d for d in shape[1:]))   # more channels (features) and larger images
    base, wider, more = shapes(data.n_classes, shape), shapes(data.n_classes, other), shapes(data.n_classes + 1, shape)

    def moved(probe):
        return {k: {d for d, (a, b) in enumerate(zip(v, probe.get(k, v))) if a != b} for k, v in base.items()}

    return moved(wider), moved(more)


def check_system_fits(saved: Mapping[str, Any], system: EquilibriumSystem, config: TrainConfig, data: Dataset,
                      path: str | Path | None = None) -> None:
    """Check that the parameters a checkpoint holds (``saved``, its ``system``) fit ``system``, the
    configured one built for ``data``.

    Raises:
        CheckpointError: parameters for inputs of another size or another number of classes (naming
            both and the ``--dataset`` the checkpoint was trained on), or parameters that do not match
            this version's system (missing or unexpected keys, other shapes), naming the model and keys.
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    model = config.model.name
    if not isinstance(saved, Mapping):
        raise _other_version(where, "its 'system' is not a table of parameters")
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in saved.items()}
    want = _shapes(system)
    missing, unexpected = [k for k in want if k not in have], [k for k in have if k not in want]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where} holds parameters that do not match this version's {model} system "
                              f"({'; '.join(parts)}): it was written by another version of leastcontrol or "
                              "for another model")
    wrong = [k for k in want if have[k] != want[k]]
    if not wrong:
        return
    try:
        by_input, by_classes = _data_dims(config, data)
    except Exception:   # a system that cannot be built for other data: no shape is explained by the data
        by_input = by_classes = {k: set() for k in want}

    def follows_data(k):   # every dimension in which the shapes differ is one the data sets
        data_dims = by_input[k] | by_classes[k]
        return (have[k] is not None and len(have[k]) == len(want[k])
                and all(d in data_dims for d, (a, b) in enumerate(zip(have[k], want[k])) if a != b))

    explained = all(follows_data(k) for k in wrong)
    if not explained:
        def size(shape):
            return "not a tensor" if shape is None else "x".join(map(str, shape)) or "a scalar"

        shown = ", ".join(f"{k} is {size(have[k])} there, {size(want[k])} here" for k in wrong)
        raise CheckpointError(f"{where} holds parameters of other shapes than this version's {model} system "
                              f"with its settings ({shown}): it was written by another version of leastcontrol "
                              "or for another model")

    def held(dims, value):   # the checkpoint's size of the dimensions that are ``value`` here
        return next((have[k][d] for k in want for d in sorted(dims[k]) if want[k][d] == value), None)

    features, channels, classes = (held(by_input, data.n_features), held(by_input, data.input_shape[0]),
                                   held(by_classes, data.n_classes))
    if features is not None:
        inputs, given = f"inputs of {features} features", f"{data.n_features} features"
    elif channels is not None and len(data.input_shape) == 3:
        inputs, given = f"inputs of {channels} channels", f"inputs of shape {'x'.join(map(str, data.input_shape))}"
    else:
        inputs, given = "inputs of another shape", f"inputs of shape {'x'.join(map(str, data.input_shape))}"
    differs = []
    if features != data.n_features:
        differs.append(given)
    if classes is not None and classes != data.n_classes:
        differs.append(f"{data.n_classes} classes")
    trained_on = config.data.name
    fix = (f"pass --dataset {trained_on}" if trained_on != data.name
           else f"pass the --data-dir of the {trained_on} data it was trained on")
    inputs += f" and {classes} classes" if classes is not None else ""
    raise CheckpointError(f"{where} holds a {model} system for {inputs}; dataset {data.name} gives "
                          f"{' and '.join(differs)}: {fix}")


def restore_system(state: Mapping[str, Any], config: TrainConfig, data: Dataset,
                   path: str | Path | None = None) -> Tuple[EquilibriumSystem, Method]:
    """The trained system a checkpoint holds (read from ``path``), sized for ``data``, with its configured
    method prepared (e.g. the feedback weights the checkpoint also holds).

    Raises:
        CheckpointError: the parameters do not fit ``data`` or this version (:func:`check_system_fits`).
    """
    system = build_system(config, data)
    method = config.build_method()
    method.prepare(system)
    check_system_fits(state["system"], system, config, data, path)
    system.load_state_dict(state["system"])
    return system, method


# A run's randomness is one stream per seed, drawn in the order of the paper's research code
# (PyTorch layers, then a shuffling DataLoader): the weights, any feedback weights, then per epoch
# two seeds, the loader's worker seed (here: the epoch's augmentation) and its sampler's (the
# shuffle). So seed s starts from the same network and visits the batches in the same order as
# seed s of the research code, which makes the two a paired comparison; resuming needs only the
# stream's state.

def init_system(config: TrainConfig, data: Dataset, method: Method, rng: torch.Generator) -> EquilibriumSystem:
    """The configured system with what ``method`` adds to it (e.g. feedback weights), drawn from ``rng``."""
    system = build_system(config, data, rng)
    method.check_system(system)
    method.prepare(system, rng)  # before the optimizer sees the parameters
    return system


def check_compatible(config: TrainConfig, method: Method) -> None:
    """Whether ``method`` can train the configured system, asked of a stand-in system of the data set's
    shape before any data loads (where the data set fixes its shape; else once the data is loaded).

    Raises:
        ConfigError or ValueError: what the method needs, naming the fix.
    """
    shape = config.data.shape()
    if shape is not None:
        input_shape, n_classes = shape
        method.check_system(config.model.build(math.prod(input_shape), n_classes, input_shape,
                                               torch.Generator().manual_seed(0)))


def _draw_seed(rng: torch.Generator) -> int:
    """One 64-bit seed from ``rng``, drawn as PyTorch's DataLoader and RandomSampler draw theirs."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=rng))


def epoch_order(rng: torch.Generator, n: int) -> tuple:
    """``(permutation of range(n), generator for the epoch's augmentation)``, the next epoch of ``rng``.

    The permutation is the one a ``DataLoader(..., shuffle=True)`` draws from a global generator
    in the same state.
    """
    augment_rng, shuffle = (torch.Generator().manual_seed(_draw_seed(rng)) for _ in range(2))
    return torch.randperm(n, generator=shuffle), augment_rng


def cosine_factor(step: int, total: int, floor: float = 0.1, start: float = 1.0) -> float:
    """Cosine decay from ``start`` to ``floor`` over ``total`` steps."""
    progress = min(step, total) / max(total, 1)
    return floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(loop: LoopConfig, total: int):
    """The schedule's factor of ``loop.lr`` at each optimizer step (0-based), for ``total`` steps.

    ``warmup-cosine`` is optax's ``warmup_cosine_decay_schedule(lr, peak·lr, W, total, 0.1·lr)``:
    ``1 + (peak − 1) t/W`` for ``t < W = floor(warmup·total)``, then a cosine from ``peak`` to 0.1
    over the remaining ``total − W`` steps.
    """
    if loop.schedule == "cosine":
        return lambda t: cosine_factor(t, total)
    if loop.schedule == "warmup-cosine":
        rise = int(loop.warmup * total)
        peak = loop.warmup_peak
        return lambda t: (1 + (peak - 1) * t / rise) if t < rise else cosine_factor(t - rise, total - rise, start=peak)
    return lambda t: 1.0


def build_optimizer(loop: LoopConfig, system: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer on every parameter of ``system``, one group per learning rate of
    ``loop.param_lr`` (matched by name or shell pattern, the first pattern that matches wins).

    Raises:
        ConfigError: a ``param_lr`` pattern that matches no parameter (naming the parameters).
    """
    import fnmatch
    named = list(system.named_parameters())
    patterns = dict(loop.param_lr or {})
    rates, used = {}, set()
    for name, _ in named:
        hit = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        rates[name] = loop.lr if hit is None else float(patterns[hit])
        used.add(hit)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(f"loop.param_lr: {', '.join(repr(p) for p in unused)} matches no parameter of the "
                          f"{type(system).__name__}; its parameters: {', '.join(n for n, _ in named)}")
    groups: Dict[float, List[torch.nn.Parameter]] = {}
    for name, p in named:
        groups.setdefault(rates[name], []).append(p)
    params = [{"params": ps, "lr": lr} for lr, ps in groups.items()] if patterns else [p for _, p in named]
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[loop.optimizer]
    return kind(params, lr=loop.lr, weight_decay=loop.weight_decay)


@torch.no_grad()
def evaluate(method: Method, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000, amp: bool = False, progress: bool = False,
             particles: torch.Tensor | None = None) -> float:
    """Test accuracy of the free equilibrium's output (``amp``: under :func:`mixed_precision`).

    ``progress`` shows a bar over the evaluation batches with the accuracy so far (a DEQ on a
    CPU takes minutes per batch). ``particles``: persistent states, a flat ``(len(y), N)`` tensor; each
    sample's free phase starts at its row, and the row is replaced by where it ended.
    """
    correct = 0
    was_training = system.training
    system.eval()  # normalisation layers use their running statistics
    starts = range(0, len(y), batch_size)
    try:
        bar = tqdm(starts, desc="evaluate", disable=not progress, leave=False, unit="batch")
        for i in bar:
            with mixed_precision(amp, system.device):
                if particles is None:
                    logits = method.predict(system, x[i:i + batch_size].to(system.device))
                else:
                    res = method.free_equilibrium(system, x[i:i + batch_size].to(system.device),
                                                  start=particles[i:i + batch_size].to(system.device))
                    logits = system.readout(res.state)
                    particles[i:i + batch_size] = method._flat_operator(system).pack(res.state).to(particles.device)
            correct += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
            seen = min(i + batch_size, len(y))
            bar.set_postfix(acc=f"{correct / seen:.4f}", seen=seen)
    finally:
        system.train(was_training)
    return correct / max(len(y), 1)


# The settings a resumed run may change (dotted prefixes): where results go, where the data is read
# from, how many test samples are evaluated at once and the device (a run interrupted on a GPU node
# may finish on a CPU). Every other setting changes the
# result and must be the checkpoint's; the number of epochs may grow where the learning rate does
# not depend on it (the cosine schedule decays over the whole budget).
_RESUME_FREE = ("output", "data.dir", "loop.eval_batch_size", "loop.device")


def _may_grow(config: "TrainConfig") -> Tuple[str, ...]:
    return ("loop.epochs",) if config.loop.schedule == "none" else ()


def with_defaults(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """A saved run's settings with the keys it lacks (added by a later version) at their defaults; the
    keys it has are kept as they are. Settings this version cannot read are returned unchanged (the
    comparison then names them)."""
    tree = dict(saved)
    rest = {k: tree.pop(k) for k in ("output", "preset") if k in tree}
    try:
        filled = TrainConfig.from_tree(tree, "checkpoint").to_dict()
    except (ValueError, TypeError):
        return dict(saved)
    filled.pop("output", None)
    filled.pop("preset", None)
    return cfg.merge(filled, {**tree, **rest})


def check_resumable(config: "TrainConfig") -> None:
    """Whether ``config`` may continue the run in its checkpoint (as :func:`train` would with ``resume``).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or of a run with other settings.
    """
    resume_state(config.output.checkpoint, True, TRAIN_FORMAT, config.to_dict(), free=_RESUME_FREE,
                 may_grow=_may_grow(config), complete=with_defaults)


# A training loss this many times the first batch's is worth a word: the run has gone badly wrong.
LOSS_GROWTH_WARNING = 100.0


class _Watch:
    """What the training loop watches to warn once per kind: a loss grown by orders of magnitude
    (likely the learning rate), an epoch in which no batch's solves settled (likely tol or max_steps)."""

    def __init__(self, run: Run, config: "TrainConfig", method: Method):
        self.run, self.config, self.method = run, config, method
        self.first_loss: Optional[float] = None
        self.warned: set = set()

    def batch(self, loss: float, epoch: int, batch: int) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        grown = not math.isfinite(loss) or loss > LOSS_GROWTH_WARNING * max(self.first_loss, 1e-12)
        if grown and "loss" not in self.warned:
            self.warned.add("loss")
            self.run.warn(f"the training loss grew from {self.first_loss:.4g} to {loss:.4g} by epoch {epoch}, "
                          f"batch {batch}: the learning rate is likely too large (--lr, now {self.config.loop.lr:g}); "
                          "lower it, or clip the gradients (loop.grad_clip)")

    def epoch(self, settled_samples: float, batches: int, epoch: int) -> None:
        if batches and not settled_samples and "settle" not in self.warned and isinstance(self.method, EquilibriumMethod):
            self.warned.add("settle")
            phases = ", ".join(f"{name} (tol {s.tol:g}, max_steps {s.max_steps})"
                               for name, s in self.method.settling_phases().items())
            self.run.warn(f"no sample of epoch {epoch} settled: every one ran to max_steps without reaching tol in a "
                          f"phase of {phases}; the updates are taken away from the equilibrium. "
                          "Raise max_steps or loosen tol (method.solver, or the phase's table: method.<phase>)")


def gradient_clip_groups(system: torch.nn.Module) -> List[List[torch.nn.Parameter]]:
    """The parameter groups whose gradient norms are clipped separately.

    The forward parameters form one group; feedback weights (``system.feedback``, set up by
    ``lcp-kp``) another, as in the research code, so a large feedback update does not shrink the
    forward one.
    """
    feedback = getattr(system, "feedback", None)
    feedback_ids = {id(p) for p in feedback.parameters()} if feedback is not None else set()
    params = list(system.parameters())
    return [g for g in ([p for p in params if id(p) not in feedback_ids],
                        [p for p in params if id(p) in feedback_ids]) if g]


def clip_gradients(groups: List[List[torch.nn.Parameter]], max_norm: float) -> None:
    """Clip each group's gradient to ``max_norm`` in its own 2-norm (``0`` or ``None``: no clipping)."""
    if max_norm:
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, max_norm)


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train ``config.model`` with ``config.method`` and return the JSON-ready result.

    Returns:
        ``{"config", "history": [{"epoch", "train_loss", "train_accuracy", "test_accuracy",
        "mean_iterations", "converged_fraction", "seconds", ...}], "test_accuracy", "train_seconds"}``

    Raises:
        ConfigError, DatasetNotFoundError, SolverDivergedError, CheckpointError.
    """
    output = config.output
    # Outputs and the checkpoint are checked before the data loads and anything trains.
    run = Run(TRAIN_FORMAT, config.to_dict(), free=_RESUME_FREE, may_grow=_may_grow(config),
              checkpoint=output.checkpoint, resume=output.resume, json_out=output.json_out, progress=output.progress,
              complete=with_defaults)
    with run.collecting():   # the library's warnings join the result's
        return _train(config, run)


def _train(config: TrainConfig, run: Run) -> Dict[str, Any]:
    loop, output = config.loop, config.output
    torch.manual_seed(loop.seed)
    method = config.build_method()
    check_compatible(config, method)
    data = config.data.load()
    device = resolve_device(loop.device)
    rng = torch.Generator().manual_seed(loop.seed)
    system = init_system(config, data, method, rng).to(device)
    clip_groups = gradient_clip_groups(system)
    optimizer = build_optimizer(loop, system)
    n_train = len(data.train_y)
    steps_per_epoch = (n_train // loop.batch_size) if loop.drop_last else math.ceil(n_train / loop.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"loop.drop_last leaves no batch: the {n_train} training samples are fewer than "
                          f"loop.batch_size = {loop.batch_size}; lower the batch size or keep the last batch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(loop, steps_per_epoch * loop.epochs))

    history: List[Dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    watch = _Watch(run, config, method)
    state = run.state
    if state is not None:
        check_system_fits(state["system"], system, config, data, output.checkpoint)
        system.load_state_dict(state["system"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, train_seconds = state["history"], state["epoch"], state["train_seconds"]

    # Persistent particles: every training and test sample's last free state (flat), on the CPU.
    particles = None
    if loop.persistent_states:
        n_state = method._flat_operator(system).n_state
        dtype = next(system.parameters()).dtype
        particles = {"train": torch.zeros(n_train, n_state, dtype=dtype),
                     "test": torch.zeros(len(data.test_y), n_state, dtype=dtype)}
        if data.val_y is not None:
            particles["validation"] = torch.zeros(len(data.val_y), n_state, dtype=dtype)
        if state is not None:
            particles = state["particles"]
    test_accuracy = history[-1]["test_accuracy"] if history else None
    for epoch in range(start_epoch + 1, loop.epochs + 1):
        t0 = time.perf_counter()
        order, augment_rng = epoch_order(rng, n_train)
        if not loop.shuffle:
            order = torch.arange(n_train)
        sums = {"loss": 0.0, "correct": 0.0, "iterations": 0.0, "sample_iterations": 0.0, "converged": 0.0,
                "skipped": 0, "unstable": 0.0, "stability_checked": 0,
                "settled_samples": 0.0}
        seen = 0
        solver_log: List[tuple] = []
        bar = run.bar(range(steps_per_epoch), desc=f"epoch {epoch}/{loop.epochs}", leave=False)
        for b in bar:
            idx = order[b * loop.batch_size:(b + 1) * loop.batch_size]
            x = config.data.preprocess(data.train_x[idx], augment_rng).to(device)
            y = data.train_y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            try:
                start = None if particles is None else particles["train"][idx].to(device)
                with mixed_precision(loop.amp, device):
                    out = method(system, x, y, start)
            except SolverDivergedError as err:
                if not loop.skip_diverged:
                    raise err.in_context(f"epoch {epoch}, batch {b + 1}",
                                         "Or set loop.skip_diverged = true: such a batch then makes no update "
                                         "and is counted in the history.") from err
                # Counted and reported in the history: this batch makes no update, but the schedule
                # moves on (as it would have after the step; PyTorch's warning that the scheduler ran
                # before any optimizer step is about a mistake this is not).
                sums["skipped"] += 1
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before `optimizer\.step\(\)",
                                            category=UserWarning)
                    scheduler.step()
                continue
            if particles is not None:
                particles["train"][idx] = out.free_state.to(particles["train"].device)
            clip_gradients(clip_groups, loop.grad_clip)
            optimizer.step()
            method.after_step(system)
            scheduler.step()
            n = len(y)
            seen += n
            watch.batch(out.loss, epoch, b + 1)
            sums["settled_samples"] += method.settled_samples(out.stats)
            sums["loss"] += out.loss * n
            sums["correct"] += (out.accuracy or 0.0) * n
            sums["iterations"] += out.stats.get("iterations", 0)
            sums["sample_iterations"] += out.stats.get("sample_iterations", out.stats.get("iterations", 0))
            sums["converged"] += bool(out.stats.get("converged", True))
            solver_log.append(_batch_solver_stats(out.stats))
            unstable = [v for k, v in out.stats.items() if k.startswith("unstable_fraction_")]
            if unstable:   # --check-stability: the worst phase of the batch
                sums["unstable"] += max(unstable)
                sums["stability_checked"] += 1
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{sums['correct'] / seen:.3f}",
                            iters=f"{sums['iterations'] / (b + 1):.0f}")
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        if (loop.eval_every and epoch % loop.eval_every == 0) or epoch == loop.epochs:
            test_accuracy = evaluate(method, system, config.data.preprocess(data.test_x, train=False), data.test_y,
                                     loop.eval_batch_size, loop.amp, output.progress,
                                     None if particles is None else particles["test"])
            evaluated = test_accuracy
            if data.val_y is not None:
                validated = evaluate(method, system, config.data.preprocess(data.val_x, train=False), data.val_y,
                                     loop.eval_batch_size, loop.amp, output.progress,
                                     None if particles is None else particles["validation"])
        else:
            evaluated = validated = None
        seen, done = max(seen, 1), max(steps_per_epoch - sums["skipped"], 1)
        record = {
            "epoch": epoch,
            "train_loss": sums["loss"] / seen,
            "train_accuracy": sums["correct"] / seen,
            "test_accuracy": evaluated,
            **({} if data.val_y is None else {"validation_accuracy": validated}),
            "mean_iterations": sums["iterations"] / done,
            "mean_sample_iterations": sums["sample_iterations"] / done,
            "converged_fraction": sums["converged"] / done,
            # Per batch, the fraction of samples settled in its worst phase; the mean over batches.
            "settled_sample_fraction": sums["settled_samples"] / done,
            "skipped_batches": sums["skipped"],
            # --check-stability: mean over batches of the largest fraction of samples a phase settled
            # at fixed points the Euler dynamics leave (None without the check).
            "unstable_fraction": (sums["unstable"] / sums["stability_checked"]) if sums["stability_checked"] else None,
            # Per training batch: solver iterations, worst final residual, worst converged fraction,
            # largest fraction stopped by the stall rule (``patience``).
            "batch_solver_stats": [list(t) for t in solver_log],
            "seconds": epoch_seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        watch.epoch(sums["settled_samples"], steps_per_epoch - sums["skipped"], epoch)
        if output.log:
            shown = "-" if evaluated is None else f"{evaluated:.4f}"
            if data.val_y is not None:
                shown += "  validation acc " + ("-" if validated is None else f"{validated:.4f}")
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}"
                       f"  test acc {shown}  iters {record['mean_iterations']:.1f}"
                       f"  converged {record['converged_fraction']:.2f}  {epoch_seconds:.1f}s")
        run.save(epoch=epoch, system=system.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), shuffle_rng=rng.get_state(), torch_rng=torch.get_rng_state(),
                 history=history, train_seconds=train_seconds,
                 **({} if particles is None else {"particles": particles}))

    result = {
        "config": config.to_dict(),
        "dataset": data.summary(),
        "history": history,
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "converged_fraction": (sum(h["converged_fraction"] for h in history) / len(history)) if history else None,
    }
    if hasattr(method, "alignment"):
        result["feedback_alignment"] = method.alignment(system)
    run.finish(result)
    result["system"] = system
    return result
