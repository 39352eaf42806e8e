"""The training loop: optimizer, cosine schedule, evaluation, checkpoints, JSON results.

>>> from leastcontrol.train import TrainConfig, train
>>> result = train(TrainConfig(epochs=1, limit_train=128, limit_test=64, progress=False))  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from .atomic import write_json
from .checkpoint import TRAIN_FORMAT, check_resume, load_checkpoint, resume_state, save_checkpoint  # noqa: F401 (load_checkpoint: public here)
from .data import DATASETS, Dataset, load_dataset
from .errors import ConfigError, SolverDivergedError
from .methods import METHODS, Method, get_method
from .solvers import SOLVERS
from .systems import SYSTEMS, EquilibriumSystem, get_system

# Published settings (docs/LCP.md §4 and the research code's commands): gradient clipping 10
# for the recurrent systems (RNN, DEQ).
DEFAULT_GRAD_CLIP = {"rnn": 10.0, "deq": 10.0}
METHOD_OPTIONS = ("alpha", "k_i", "k_p", "kappa", "dt", "tol", "max_iter", "solver", "check_every", "impl", "compile", "native", "warm_start_tol",
                  "controlled_residual", "patience", "stall_tol",
                  "ebd_optim", "ebd_lr", "ebd_steps", "ff_init",
                  "sigma", "tau_noise", "noise_steps", "tau_q", "wd_q", "timescale")
# Settings of the solver itself, passed to the method as its solver_options.
SOLVER_OPTIONS = ("anderson_memory", "anderson_after", "anderson_restarts", "check_stability")


@dataclass
class TrainConfig:
    """Everything a training run depends on; validated at construction.

    Method settings left at ``None`` take the method's published defaults
    (``lcp-di``: tol 1e-6, max 800; ``rbp``: tol 1e-4, max 200).
    ``grad_clip=None`` takes the model's published default (RNN and DEQ 10, FF none);
    ``0`` disables clipping. ``skip_diverged=True`` turns a batch whose solve
    diverges into a batch without update (counted as ``skipped_batches`` in the
    history) instead of an error that stops the run.
    """

    model: str = "rnn"
    method: str = "lcp-di"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    hidden: int = 256
    recurrent_bias: bool = False   # rnn: a second hidden bias on W φ(v), as in the research code
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    grad_clip: Optional[float] = None
    alpha: Optional[float] = None
    k_i: Optional[float] = None
    k_p: Optional[float] = None
    kappa: Optional[float] = None
    dt: Optional[float] = None
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    solver: Optional[str] = None
    check_every: Optional[int] = None
    impl: Optional[str] = None
    compile: Optional[bool] = None
    native: Optional[bool] = None   # RNN on the CPU: the last few samples of every solve in C
    anderson_memory: Optional[int] = None   # euler: Anderson mixing at each check (solver_options)
    anderson_after: Optional[int] = None
    anderson_restarts: Optional[int] = None   # euler: returns to the best point after a jump (None: no limit)
    check_stability: Optional[bool] = None  # every solve: flag fixed points the Euler dynamics leave (solver_options)
    warm_start_tol: Optional[float] = None
    controlled_residual: Optional[str] = None
    patience: Optional[int] = None
    stall_tol: Optional[float] = None
    ebd_optim: Optional[str] = None
    ebd_lr: Optional[float] = None
    ebd_steps: Optional[int] = None
    ff_init: Optional[bool] = None
    sigma: Optional[float] = None
    tau_noise: Optional[float] = None
    noise_steps: Optional[int] = None
    tau_q: Optional[float] = None
    wd_q: Optional[float] = None
    timescale: Optional[float] = None
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 1000
    json_out: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    skip_diverged: bool = False
    device: str = "cpu"
    amp: bool = False
    augment: bool = False
    progress: bool = True

    def __post_init__(self):
        for key, registry in (("model", SYSTEMS), ("method", METHODS), ("dataset", DATASETS)):
            registry.factory(getattr(self, key))  # unknown names raise, listing the valid ones
        if self.solver is not None:
            SOLVERS.factory(self.solver)
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; valid optimizers: adam, sgd")
        if self.schedule not in ("none", "cosine"):
            raise ConfigError(f"unknown schedule '{self.schedule}'; valid schedules: cosine, none")
        for key in ("hidden", "epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if not (isinstance(self.eval_every, int) and self.eval_every >= 0):
            raise ConfigError(f"eval_every must be >= 0 (0: only at the end), got {self.eval_every!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.grad_clip is None:
            self.grad_clip = DEFAULT_GRAD_CLIP.get(self.model, 0.0)
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"unknown device '{self.device}'; valid: auto, cpu, cuda")
        if self.recurrent_bias and self.model != "rnn":
            raise ConfigError(f"recurrent_bias is an option of the rnn model, not of '{self.model}'")
        if self.augment and self.dataset != "cifar10":
            raise ConfigError("augment (random crop + flip) is for cifar10 only")
        check_resume(self.checkpoint, self.resume)
        self.build_method()  # method settings are validated here, before any data is read

    def method_options(self) -> Dict[str, Any]:
        """The method settings that were given, restricted to those the method accepts."""
        factory = METHODS.factory(self.method)
        accepted = {f.name for f in fields(factory)} if hasattr(factory, "__dataclass_fields__") else set(METHOD_OPTIONS)
        options = {k: getattr(self, k) for k in METHOD_OPTIONS if getattr(self, k) is not None and k in accepted}
        solver_options = {k: getattr(self, k) for k in SOLVER_OPTIONS if getattr(self, k) is not None}
        if solver_options:
            if "solver_options" not in accepted:
                raise ConfigError(f"{', '.join(solver_options)} set the solver of an equilibrium method; "
                                  f"'{self.method}' has none")
            options["solver_options"] = solver_options
        return options

    def build_method(self) -> Method:
        return get_method(self.method, **self.method_options())

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def config_from_mapping(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping, naming any unknown key or wrongly typed value.

    Raises:
        ConfigError: unknown key, wrong type, or an invalid value.
    """
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{key}'; valid keys: {', '.join(sorted(hints))}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: key '{key}' must be {_type_name(hints[key])}, got {value!r}")
    return TrainConfig(**values)


def load_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a run configuration from a TOML (``.toml``) or JSON file; keys are :class:`TrainConfig` fields.

    Raises:
        ConfigError: missing or unparsable file, unknown key, wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    config_from_mapping(values, source=str(path))  # validate the file on its own, naming the file
    return values


def mixed_precision(enabled: bool, device: torch.device):
    """bf16 autocast of the dynamics' convolutions and matrix products (``--amp``), else a no-op.

    Only those products run in bf16: the state, the control and the parameter updates stay in
    the parameters' dtype (fp32), because the solvers add fp32 state to the field's output and
    :func:`~leastcontrol.methods.base.accumulate_grads` casts updates to each parameter's dtype.
    bf16 resolves about 3 decimal digits, so the relative residual of a solve has a floor near
    1e-3: pair ``--amp`` with a loose ``--tol`` or with ``--patience``.
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


def preprocess(config: TrainConfig, x: torch.Tensor, generator: torch.Generator | None = None,
               train: bool = True) -> torch.Tensor:
    """Per-batch input transform: CIFAR-10 is normalised per channel (and augmented when training)."""
    if config.dataset != "cifar10":
        return x
    from .data.cifar import augment, normalize

    if train and config.augment:
        x = augment(x, generator)
    return normalize(x)


def _batch_solver_stats(stats: Dict[str, Any]) -> tuple:
    """(iterations, worst final residual, worst converged fraction, largest stalled fraction) of one batch."""
    residuals = [v for k, v in stats.items() if k.startswith("residual_")]
    fractions = [v for k, v in stats.items() if k.startswith("converged_fraction_")]
    stalled = [v for k, v in stats.items() if k.startswith("stalled_fraction_")]
    return (stats.get("iterations", 0), max(residuals) if residuals else None,
            min(fractions) if fractions else None, max(stalled) if stalled else None)


def build_system(config: TrainConfig, data: Dataset, generator: torch.Generator | None = None) -> EquilibriumSystem:
    """The configured system, initialised from ``generator`` (default: a fresh one seeded with ``config.seed``)."""
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    extra = {"recurrent_bias": True} if config.recurrent_bias else {}
    return get_system(config.model, data.n_features, data.n_classes, hidden=config.hidden,
                      input_shape=data.input_shape, generator=generator, **extra)


def config_from_checkpoint(state: Mapping[str, Any]) -> TrainConfig:
    """The settings a training checkpoint (``load_checkpoint``) was written with, for evaluation only."""
    return TrainConfig(**dict(state["config"], json_out=None, checkpoint=None, resume=False, progress=False))


def restore_system(state: Mapping[str, Any], config: TrainConfig, data: Dataset) -> Tuple[EquilibriumSystem, Method]:
    """The trained system a checkpoint holds, sized for ``data``, with its configured method prepared
    (e.g. the feedback weights the checkpoint also holds)."""
    system = build_system(config, data)
    method = config.build_method()
    method.prepare(system)
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
    method.prepare(system, rng)  # before the optimizer sees the parameters
    return system


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


def cosine_factor(step: int, total: int, floor: float = 0.1) -> float:
    """Cosine decay from 1 to ``floor`` over ``total`` steps."""
    progress = min(step, total) / max(total, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(method: Method, system: EquilibriumSystem, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000, amp: bool = False, progress: bool = False) -> float:
    """Test accuracy of the free equilibrium's output (``amp``: under :func:`mixed_precision`).

    ``progress`` shows a bar over the evaluation batches with the accuracy so far (a DEQ on a
    CPU takes minutes per batch).
    """
    correct = 0
    was_training = system.training
    system.eval()  # normalisation layers use their running statistics
    starts = range(0, len(y), batch_size)
    try:
        bar = tqdm(starts, desc="evaluate", disable=not progress, leave=False, unit="batch")
        for i in bar:
            with mixed_precision(amp, system.device):
                logits = method.predict(system, x[i:i + batch_size].to(system.device))
            correct += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
            seen = min(i + batch_size, len(y))
            bar.set_postfix(acc=f"{correct / seen:.4f}", seen=seen)
    finally:
        system.train(was_training)
    return correct / max(len(y), 1)


_RESUME_KEYS = ("model", "method", "dataset", "limit_train", "hidden", "recurrent_bias", "batch_size", "lr", "optimizer",
                "schedule", "seed", "epochs")


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
    torch.manual_seed(config.seed)
    method = config.build_method()
    data = load_dataset(config.dataset, config.data_dir, config.limit_train, config.limit_test)
    device = resolve_device(config.device)
    rng = torch.Generator().manual_seed(config.seed)
    system = init_system(config, data, method, rng).to(device)
    params = list(system.parameters())
    clip_groups = gradient_clip_groups(system)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    n_train = len(data.train_y)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    factor = (lambda s: cosine_factor(s, total_steps)) if config.schedule == "cosine" else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    history: List[Dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    ckpt_path = Path(config.checkpoint) if config.checkpoint else None
    state = resume_state(ckpt_path, config.resume, TRAIN_FORMAT, config.to_dict(), _RESUME_KEYS)
    if state is not None:
        system.load_state_dict(state["system"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, train_seconds = state["history"], state["epoch"], state["train_seconds"]

    test_accuracy = history[-1]["test_accuracy"] if history else None
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        order, augment_rng = epoch_order(rng, n_train)
        sums = {"loss": 0.0, "correct": 0.0, "iterations": 0.0, "sample_iterations": 0.0, "converged": 0.0,
                "skipped": 0, "unstable": 0.0, "stability_checked": 0}
        seen = 0
        solver_log: List[tuple] = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress,
                   leave=False, dynamic_ncols=True)
        for b in bar:
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = preprocess(config, data.train_x[idx], augment_rng).to(device)
            y = data.train_y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            try:
                with mixed_precision(config.amp, device):
                    out = method(system, x, y)
            except SolverDivergedError as err:
                if not config.skip_diverged:
                    raise SolverDivergedError(
                        err.population, err.step, f"epoch {epoch}, batch {b + 1}: {err.solver}",
                        f"{err.hint} Or pass --skip-diverged (skip_diverged=True): such a batch then makes "
                        "no update and is counted in the history.") from err
                # Counted and reported in the history: this batch makes no update.
                sums["skipped"] += 1
                scheduler.step()
                continue
            clip_gradients(clip_groups, config.grad_clip)
            optimizer.step()
            method.after_step(system)
            scheduler.step()
            n = len(y)
            seen += n
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
        if (config.eval_every and epoch % config.eval_every == 0) or epoch == config.epochs:
            test_accuracy = evaluate(method, system, preprocess(config, data.test_x, train=False), data.test_y,
                                     config.eval_batch_size, config.amp, config.progress)
            evaluated = test_accuracy
        else:
            evaluated = None
        seen, done = max(seen, 1), max(steps_per_epoch - sums["skipped"], 1)
        record = {
            "epoch": epoch,
            "train_loss": sums["loss"] / seen,
            "train_accuracy": sums["correct"] / seen,
            "test_accuracy": evaluated,
            "mean_iterations": sums["iterations"] / done,
            "mean_sample_iterations": sums["sample_iterations"] / done,
            "converged_fraction": sums["converged"] / done,
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
        if config.progress:
            shown = "-" if evaluated is None else f"{evaluated:.4f}"
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}"
                       f"  test acc {shown}  iters {record['mean_iterations']:.1f}"
                       f"  converged {record['converged_fraction']:.2f}  {epoch_seconds:.1f}s")
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "format": TRAIN_FORMAT, "config": config.to_dict(), "epoch": epoch,
                "system": system.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "shuffle_rng": rng.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "train_seconds": train_seconds,
            })

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
    if config.json_out:
        write_json(config.json_out, result)
    result["system"] = system
    return result
