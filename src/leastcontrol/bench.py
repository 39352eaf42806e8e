"""Speed and memory benchmark of the learning methods: ``leastcontrol bench``.

Every row (model × method × implementation × solver settings) trains its own
copy of the same starting network on the same MNIST-sized batches. The rows
are timed interleaved — batch ``i`` of every row before batch ``i + 1`` of
any — so a slow spell of a noisy machine hits all rows alike and the ratios
stay fair. Peak memory of one training batch is measured in a fresh
subprocess per setting on the CPU (peak resident set size); on CUDA the
allocator's own peak (``torch.cuda.max_memory_allocated``) is exact per step,
so it is read in the bench's process, around each timed batch.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from .atomic import write_json
from .errors import ConfigError, SolverDivergedError
from .methods import get_method
from .methods.base import EquilibriumMethod, Method
from .systems import get_system
from .train import clip_gradients, gradient_clip_groups

# Published settings (docs/LCP.md §4) for every row; bench rows add their own overrides.
PUBLISHED = {
    "bp": {}, "bptt": {}, "rbp": {"tol": 1e-4, "max_iter": 200},
    "lcp-di": {}, "lcp-kp": {}, "lcp-lf": {},
    ("ff", "lcp-ebd"): {"ebd_lr": 0.01, "ebd_steps": 800, "ff_init": False},
    ("rnn", "lcp-ebd"): {"ebd_lr": 1e-3, "ebd_steps": 200, "ff_init": True},
}
GRAD_CLIP = {"rnn": 10.0, "ff": 0.0}
STALL_PATIENCE = 100
LONG_PATIENCE = 300
# The same β = k_i/α = 10 as the published α 0.1, k_i 1, so the same controlled equilibrium and
# update; the leak no longer caps the controller's rate at 1 − α = 0.9 per step.
FAST_GAINS = {"alpha": 1.0, "k_i": 10.0}
COMPILE = {"compile": True}
# Euler with Anderson mixing at each convergence check (the map of check_every steps), from
# step 60 for LCP-DI (past the bulk of its controlled phase) and 30 for RBP. For LCP-DI a sample
# whose residual jumps stops mixing at once (anderson_restarts 0): some trajectories pass a saddle,
# where returning to the best point and mixing again traps them (solvers._check_mix).
ACCEL_LCP = {"solver_options": {"anderson_memory": 3, "anderson_after": 60, "anderson_restarts": 0}}
ACCEL_RBP = {"solver_options": {"anderson_memory": 3, "anderson_after": 30}}
# The steps of the last few active samples of each solve in C (leastcontrol.native), the bulk compiled.
NATIVE = {"native": True, **COMPILE}
# Options that change the path to the controlled equilibrium, not the equilibrium: the update
# cosine of a row compares with the research-code path at the published settings without them.
PATH_OPTIONS = ("solver", "solver_options", "patience", "alpha", "k_i", "warm_start_tol", "compile", "native")


@dataclass
class Row:
    """One benchmarked setting."""

    model: str
    method: str
    impl: str = "fast"
    options: Dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def build(self) -> Method:
        key = (self.model, self.method)
        settings = dict(PUBLISHED.get(key, PUBLISHED.get(self.method, {})))
        settings.update(self.options)
        if self.impl != "fast":
            settings["impl"] = self.impl
        return get_method(self.method, **settings)

    @property
    def name(self) -> str:
        return self.label or f"{self.model}-{self.method}" + ("" if self.impl == "fast" else f"-{self.impl}")


def default_rows() -> List[Row]:
    """The ten published rows, plus the rows the ratios need."""
    rows = [Row("ff", "bp")] + [Row("ff", m) for m in ("lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd")]
    rows += [Row("rnn", "rbp")] + [Row("rnn", m) for m in ("lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd")]
    rows += [
        Row("rnn", "lcp-di", impl="autograd"),
        Row("rnn", "lcp-di", options={"tol": 1e-4}, label="rnn-lcp-di-tol1e-4"),
        Row("rnn", "rbp", options={"solver": "anderson"}, label="rnn-rbp-anderson"),
        # The same tolerances with the stall rule: samples whose controlled dynamics keep
        # oscillating stop once their residual has not fallen by 10 % in STALL_PATIENCE steps.
        Row("rnn", "lcp-di", options={"patience": STALL_PATIENCE}, label="rnn-lcp-di-stall"),
        Row("rnn", "lcp-di", options={"tol": 1e-4, "patience": STALL_PATIENCE}, label="rnn-lcp-di-tol1e-4-stall"),
        # The same β with faster controller gains, then also a 1e-4 warm start and the stall rule.
        Row("rnn", "lcp-di", options=dict(FAST_GAINS), label="rnn-lcp-di-gains"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4}, label="rnn-lcp-di-gains-tol1e-4"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, "patience": STALL_PATIENCE},
            label="rnn-lcp-di-gains-stall"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "patience": STALL_PATIENCE},
            label="rnn-lcp-di-gains-tol1e-4-stall"),
        # RBP's tolerance and RBP's cap of 200 steps per phase: the like-for-like cost of the two.
        Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "max_iter": 200}, label="rnn-lcp-di-gains-tol1e-4-max200"),
        # The Euler steps between two convergence checks as one torch.compile graph, for both methods.
        Row("ff", "lcp-di", options=dict(COMPILE), label="ff-lcp-di-compile"),
        Row("rnn", "rbp", options=dict(COMPILE), label="rnn-rbp-compile"),
        Row("rnn", "lcp-di", options=dict(COMPILE), label="rnn-lcp-di-compile"),
        Row("rnn", "lcp-di", options={"tol": 1e-4, **COMPILE}, label="rnn-lcp-di-tol1e-4-compile"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, "patience": STALL_PATIENCE, **COMPILE},
            label="rnn-lcp-di-gains-stall-compile"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "patience": STALL_PATIENCE, **COMPILE},
            label="rnn-lcp-di-gains-tol1e-4-stall-compile"),
        # The fast gains and warm start alone, then with a patience that lets slow samples settle:
        # at 100 the stall rule also stops samples that would settle, and the update moves.
        Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, **COMPILE}, label="rnn-lcp-di-gains-compile"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, "patience": LONG_PATIENCE, **COMPILE},
            label="rnn-lcp-di-gains-stall300-compile"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "patience": LONG_PATIENCE, **COMPILE},
            label="rnn-lcp-di-gains-tol1e-4-stall300-compile"),
    ]
    # RBP at LCP-DI's tolerance and cap (1e-6, 800): the other reading of "equal tolerance".
    rbp_tight = {"tol": 1e-6, "max_iter": 800}
    rows += [
        Row("rnn", "rbp", options={**rbp_tight, **COMPILE}, label="rnn-rbp-tol1e-6-compile"),
        Row("rnn", "rbp", options={**rbp_tight, **ACCEL_RBP, **COMPILE}, label="rnn-rbp-tol1e-6-accel-compile"),
        Row("rnn", "rbp", options={**rbp_tight, "patience": STALL_PATIENCE, **ACCEL_RBP, **COMPILE},
            label="rnn-rbp-tol1e-6-stall-accel-compile"),
    ]
    # Check-level Anderson mixing of the Euler steps, eager and compiled.
    for suffix, extra in (("", {}), ("-compile", COMPILE)):
        rows += [
            Row("rnn", "rbp", options={**ACCEL_RBP, **extra}, label=f"rnn-rbp-accel{suffix}"),
            # Without the stall rule: every sample runs until it settles or reaches max_iter.
            Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, **ACCEL_LCP, **extra},
                label=f"rnn-lcp-di-gains-accel{suffix}"),
            Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, "patience": STALL_PATIENCE, **ACCEL_LCP,
                                          **extra}, label=f"rnn-lcp-di-gains-stall-accel{suffix}"),
            Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "patience": STALL_PATIENCE, **ACCEL_LCP, **extra},
                label=f"rnn-lcp-di-gains-tol1e-4-stall-accel{suffix}"),
            Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, "patience": LONG_PATIENCE, **ACCEL_LCP,
                                          **extra}, label=f"rnn-lcp-di-gains-stall300-accel{suffix}"),
            Row("rnn", "lcp-di", options={**FAST_GAINS, "tol": 1e-4, "patience": LONG_PATIENCE, **ACCEL_LCP, **extra},
                label=f"rnn-lcp-di-gains-tol1e-4-stall300-accel{suffix}"),
        ]
    # The tail of every solve in C (free phase, RBP's adjoint, LCP's controlled phase), the bulk
    # compiled: RBP as published and at LCP's tolerance, LCP-DI with the settings of the fastest
    # compiled rows above.
    stall300 = {**FAST_GAINS, "patience": LONG_PATIENCE}
    rows += [
        Row("rnn", "rbp", options=dict(NATIVE), label="rnn-rbp-native"),
        Row("rnn", "rbp", options={**rbp_tight, **NATIVE}, label="rnn-rbp-tol1e-6-native"),
        Row("rnn", "lcp-di", options={**FAST_GAINS, "warm_start_tol": 1e-4, **NATIVE}, label="rnn-lcp-di-gains-native"),
        Row("rnn", "lcp-di", options={**stall300, "warm_start_tol": 1e-4, **NATIVE}, label="rnn-lcp-di-gains-stall300-native"),
        Row("rnn", "lcp-di", options={**stall300, "tol": 1e-4, **NATIVE}, label="rnn-lcp-di-gains-tol1e-4-stall300-native"),
        Row("rnn", "lcp-di", options={**stall300, "warm_start_tol": 1e-4, **ACCEL_LCP, **NATIVE},
            label="rnn-lcp-di-gains-stall300-accel-native"),
        Row("rnn", "lcp-di", options={**stall300, "tol": 1e-4, **ACCEL_LCP, **NATIVE},
            label="rnn-lcp-di-gains-tol1e-4-stall300-accel-native"),
    ]
    return rows


def rows_for_device(rows: List[Row], device: str) -> List[Row]:
    """The rows that run on ``device``: the C steps (``native``) are the CPU's."""
    return rows if device == "cpu" else [r for r in rows if not r.options.get("native")]


def rows_named(labels: List[str]) -> List[Row]:
    """The default rows with these labels, in the order given.

    Raises:
        ConfigError: a label that is no default row's (or none given), listing the valid ones.
    """
    known = {r.name: r for r in default_rows()}
    unknown = [label for label in labels if label not in known]
    if unknown or not labels:
        raise ConfigError(f"unknown bench row(s) {', '.join(unknown) or '(none given)'}; rows: {', '.join(known)}")
    return [known[label] for label in labels]


@dataclass
class BenchConfig:
    """Settings of a benchmark run; validated at construction."""

    batch_size: int = 64
    hidden: int = 256
    batches: int = 20
    warmup: int = 3
    pretrain: int = 156
    data_dir: Optional[str] = None
    device: str = "cpu"
    memory: bool = True
    seed: int = 0
    json_out: Optional[str] = None
    progress: bool = True
    rows: Optional[List[str]] = None   # labels of the rows to run (None: every default row)

    def __post_init__(self):
        named = None if self.rows is None else rows_named(self.rows)   # an unknown label fails first
        for key in ("batch_size", "hidden", "batches"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("warmup", "pretrain"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 0):
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"unknown device '{self.device}'; valid: auto, cpu, cuda")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if named is not None:
            runnable = rows_for_device(named, self.device)
            cpu_only = [r.name for r in named if r not in runnable]
            if cpu_only:
                raise ConfigError(f"bench rows {', '.join(cpu_only)} run their tails in C, on the CPU only; "
                                  "drop them or use --device cpu")


def _batches(config: BenchConfig, n: int):
    """``n`` MNIST-sized batches: real MNIST from ``data_dir`` if given, else uniform noise with random labels."""
    g = torch.Generator().manual_seed(config.seed)
    B = config.batch_size
    if config.data_dir:
        from .data import load_dataset
        ds = load_dataset("mnist", config.data_dir, limit_train=n * B, limit_test=1)
        x = ds.train_x.reshape(len(ds.train_x), -1)
        y = ds.train_y
        idx = torch.randperm(len(x), generator=g)
        x, y = x[idx], y[idx]
        reps = math.ceil(n * B / len(x))
        x, y = x.repeat(reps, 1)[: n * B], y.repeat(reps)[: n * B]
    else:
        x = torch.rand(n * B, 784, generator=g)
        y = torch.randint(0, 10, (n * B,), generator=g)
    dev = torch.device(config.device)
    return [(x[i * B:(i + 1) * B].to(dev), y[i * B:(i + 1) * B].to(dev)) for i in range(n)]


def split_batches(config: BenchConfig, n: int):
    """``n`` batches to time and, drawn with them but disjoint from them, ``config.pretrain`` batches
    to pretrain on (at least one), so that no timed batch is one the starting network has learned."""
    drawn = _batches(config, n + max(config.pretrain, 1))
    return drawn[:n], drawn[n:]


def _network(model: str, config: BenchConfig):
    g = torch.Generator().manual_seed(config.seed)
    return get_system(model, 784, 10, hidden=config.hidden, generator=g).to(config.device)


class _Trainer:
    """One row's network, optimizer and the step it times."""

    def __init__(self, row: Row, net, config: BenchConfig):
        self.row, self.net = row, net
        self.method = row.build()
        # PyTorch seeds its global generator from entropy in each process. A row's random draws
        # (KP's and LF's feedback, LF's noise during a step) come from generators seeded here and
        # before each step, so its steps are the same in every run, whatever rows run beside it.
        self.seed, self.steps_taken = config.seed, 0
        self.method.prepare(net, torch.Generator().manual_seed(config.seed))
        self.opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        self.clip = GRAD_CLIP[row.model]
        self.clip_groups = gradient_clip_groups(net)   # after prepare(): KP's feedback is its own group
        self.seconds: List[float] = []
        self.rounds: List[int] = []       # the bench round of each timed batch, for paired comparisons
        self.iterations: List[float] = []
        self.sample_iterations: List[float] = []
        self.diverged = 0   # timed batches whose solve diverged: no update, not in the times
        self.peak_mb: Optional[float] = None   # CUDA: the most a timed batch allocated beyond what was held

    def step(self, x, y, record: bool) -> None:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        torch.manual_seed(self.seed * 100_003 + self.steps_taken)   # LF's noise draws from the global generator
        self.steps_taken += 1
        sync()
        if record and x.is_cuda:
            torch.cuda.reset_peak_memory_stats(x.device)
            held = torch.cuda.memory_allocated(x.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        try:
            out = self.method(self.net, x, y)
        except SolverDivergedError:
            # As under ``train --skip-diverged``: the batch makes no update, and it is counted.
            self.diverged += record
            return
        clip_gradients(self.clip_groups, self.clip)
        self.opt.step()
        self.method.after_step(self.net)
        sync()
        if record:
            self.seconds.append(time.perf_counter() - t0)
            if x.is_cuda:
                added = (torch.cuda.max_memory_allocated(x.device) - held) / 2**20
                self.peak_mb = max(self.peak_mb or 0.0, added)
            self.rounds.append(self.steps_taken - 1)
            self.iterations.append(float(out.stats.get("iterations", 0)))
            self.sample_iterations.append(float(out.stats.get("sample_iterations", out.stats.get("iterations", 0))))

    def inference_seconds(self, batches, repeats: int = 5) -> float:
        sync = torch.cuda.synchronize if batches[0][0].is_cuda else (lambda: None)
        times = []
        for x, _ in batches[:repeats]:
            sync()
            t0 = time.perf_counter()
            self.method.predict(self.net, x)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _unless_diverged(measure, *args):
    """``measure(*args)``, or None when a solve in it diverges (the row reports what it could)."""
    try:
        return measure(*args)
    except SolverDivergedError:
        return None


def flat_update(grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A method's parameter update as one vector, parameters in name order (for cosines between updates)."""
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


def _flat_grads(method: Method, net, x, y) -> torch.Tensor:
    out = method.gradients(copy.deepcopy(net), *method._inputs(net, x, y))
    return flat_update(out.grads)


# A row gives its method's update when its cosine with the reference path's update is above this
# on every timed batch where the reference settles; only such rows compete for the headline ratios.
AGREEMENT = 0.9999


def reference_row(row: Row) -> Optional[Row]:
    """The research-code path a row's update is compared with (None: nothing to compare).

    Euler, every step to ``tol`` or ``max_iter``, no stall rule, at the published controller gains and
    warm start (``PATH_OPTIONS`` dropped: they change the path to the controlled equilibrium, not the
    equilibrium), one ``torch.autograd.grad`` per step.
    """
    if row.impl != "fast" or row.method == "bptt" or not isinstance(row.build(), EquilibriumMethod):
        return None
    return Row(row.model, row.method, "autograd", {k: v for k, v in row.options.items() if k not in PATH_OPTIONS})


class References:
    """The reference paths' updates on fixed weights and batches, each reference computed once.

    A batch where the reference's solve does not settle (some sample at ``max_iter``) or diverges
    has no update to agree with: the reference there is one snapshot of a sample's orbit, and any
    other path or step count gives another. It is ``None`` in :meth:`updates`.
    """

    def __init__(self, nets: Dict[str, Any], batches):
        self.nets, self.batches = nets, batches
        self._cache: Dict[str, List[Optional[torch.Tensor]]] = {}

    def updates(self, reference: Row) -> List[Optional[torch.Tensor]]:
        key = json.dumps([reference.model, reference.method, reference.options], sort_keys=True, default=str)
        if key not in self._cache:
            method, net = reference.build(), self.nets[reference.model]
            updates = []
            for x, y in self.batches:
                torch.manual_seed(0)
                try:
                    out = method.gradients(copy.deepcopy(net), *method._inputs(net, x, y))
                except SolverDivergedError:
                    updates.append(None)
                    continue
                updates.append(flat_update(out.grads).double() if _settled(method, out.stats) else None)
            self._cache[key] = updates
        return self._cache[key]


def _settled(method: Method, stats: Dict[str, Any]) -> bool:
    """Whether a reference's solves settled. LCP-EBD's second phase is a fixed budget of optimizer
    steps, whose end is its answer whatever the residual there: only its free phase is a solve."""
    if method.name == "lcp-ebd":
        return stats.get("converged_free", True)
    return stats.get("converged", True)


def update_agreement(row: Row, references: References) -> Dict[str, Any]:
    """The row's update against its reference path's on each of the references' batches (fixed weights).

    Returns:
        ``{"update_cosines": [...], "update_cosine_vs_autograd": smallest of them, "agreement_batches": n,
        "agrees": bool}``: one cosine per batch (float64), ``None`` where the reference did not settle or
        the row diverged; the smallest over the ``n`` batches that have one (``None`` when none has, or
        the row has no reference); whether that smallest one exceeds ``AGREEMENT`` (``None``: no reference).
    """
    reference = reference_row(row)
    if reference is None:
        return {"update_cosines": [], "update_cosine_vs_autograd": None, "agreement_batches": 0, "agrees": None}
    method, net = row.build(), references.nets[row.model]
    cosines: List[Optional[float]] = []
    for (x, y), ref in zip(references.batches, references.updates(reference)):
        if ref is None:
            cosines.append(None)
            continue
        torch.manual_seed(0)
        try:
            update = _flat_grads(method, net, x, y).double()
        except SolverDivergedError:
            cosines.append(None)
            continue
        # In float64: float32 sums over the ~270k entries of an RNN update round a cosine of 1 to 1 ± 1e-5.
        cosines.append(float(torch.nn.functional.cosine_similarity(update, ref, dim=0)))
    compared = [c for c in cosines if c is not None]
    smallest = min(compared) if compared else None
    return {"update_cosines": cosines, "update_cosine_vs_autograd": smallest, "agreement_batches": len(compared),
            "agrees": smallest is not None and smallest > AGREEMENT}


def paired_iterations(row: Row, reference: Row, net, batches) -> Dict[str, Any]:
    """Iterations of ``row`` and of ``reference`` on the same network and the same batches.

    The timed rows each train their own copy of the network, so after a few steps their
    iteration counts come from different weights; this measurement holds the weights fixed,
    which isolates what the implementation does to the number of steps.

    Returns:
        ``{"batches", "iterations", "reference_iterations", "ratio"}``, ratio = reference / row
        of the per-batch means.
    """
    counts: Dict[str, List[float]] = {"iterations": [], "reference_iterations": []}
    for key, r in (("iterations", row), ("reference_iterations", reference)):
        method = r.build()
        for x, y in batches:
            torch.manual_seed(0)
            out = method.gradients(copy.deepcopy(net), *method._inputs(net, x, y))
            counts[key].append(float(out.stats["iterations"]))
    mean, ref = statistics.mean(counts["iterations"]), statistics.mean(counts["reference_iterations"])
    return {"batches": len(batches), **counts, "ratio": _ratio(ref, mean)}


def _pretrained(model: str, config: BenchConfig, batches) -> Any:
    """The starting network of every row of ``model``: ``pretrain`` batches of its baseline (bp / lcp-di)."""
    net = _network(model, config)
    if config.pretrain:
        trainer = _Trainer(Row(model, "bp" if model == "ff" else "lcp-di"), net, config)
        for i in tqdm(range(config.pretrain), desc=f"pretrain {model}", disable=not config.progress, leave=False):
            x, y = batches[i % len(batches)]
            trainer.step(x, y, record=False)
    return net


def peak_memory_mb(row: Row, config: BenchConfig) -> float:
    """Peak memory of one training batch of ``row`` from a fresh network (MB): on the CPU in a fresh
    process (its resident set's high-water mark), on CUDA in this one (the allocator's peak)."""
    if config.device == "cuda":
        return _one_batch_peak_mb(row, config)
    spec = json.dumps({"row": asdict(row), "config": asdict(config)})
    proc = subprocess.run([sys.executable, "-c", "import sys, leastcontrol.bench as b; b._memory_probe(sys.argv[1])", spec],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {row.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _one_batch_peak_mb(row: Row, config: BenchConfig) -> float:
    """CUDA: what one training batch of ``row`` allocates beyond the memory held before it (MB)."""
    config = BenchConfig(**{**asdict(config), "progress": False, "data_dir": None})
    trainer = _Trainer(row, _network(row.model, config), config)
    (x, y), = _batches(config, 1)
    trainer.step(x, y, record=True)
    return trainer.peak_mb


def _memory_probe(spec: str) -> None:
    """Subprocess entry (CPU): print the peak memory (MB) one training batch adds."""
    data = json.loads(spec)
    row, config = Row(**data["row"]), BenchConfig(**{**data["config"], "progress": False, "data_dir": None})
    torch.set_num_threads(1)
    net = _network(row.model, config)
    trainer = _Trainer(row, net, config)
    (x, y), = _batches(config, 1)
    try:  # reset the kernel's high-water mark so the peak is this batch's alone
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = _rss_mb("VmRSS")
    trainer.step(x, y, record=False)
    print(max(_rss_mb("VmHWM") - base, 0.0))


def run_bench(config: BenchConfig, rows: Optional[List[Row]] = None) -> Dict[str, Any]:
    """Time every row interleaved and return ``{"config", "rows", "ratios"}`` (see ``docs/performance.md``)."""
    rows = rows or rows_for_device(default_rows(), config.device)
    n = config.warmup + config.batches
    batches, pretraining = split_batches(config, max(n, 8))
    start = {m: _pretrained(m, config, pretraining) for m in sorted({r.model for r in rows})}
    trainers = [_Trainer(r, copy.deepcopy(start[r.model]), config) for r in rows]
    for i in tqdm(range(n), desc="bench rounds", disable=not config.progress):
        x, y = batches[i % len(batches)]
        for t in trainers:
            t.step(x, y, record=i >= config.warmup)
    results = []
    # Agreement at the starting weights on every timed batch (the trained copies have drifted apart).
    references = References(start, batches[config.warmup:n])
    for t in tqdm(trainers, desc="inference, agreement", disable=not config.progress, leave=False):
        timed = bool(t.seconds)
        med = statistics.median(t.seconds) if timed else None
        iters = statistics.mean(t.iterations) if timed else None
        results.append({
            "model": t.row.model, "method": t.row.method, "impl": t.row.impl, "label": t.row.name,
            "solver": _solver_label(t.method), "tol": getattr(t.method, "tol", None),
            "max_iter": getattr(t.method, "max_iter", None),
            "seconds_per_batch_median": med, "seconds_per_batch_min": min(t.seconds) if timed else None,
            # Every timed batch, by bench round (a diverged batch has none): what the intervals resample.
            "seconds_per_batch": dict(zip(t.rounds, t.seconds)),
            "mean_iterations": iters,
            "mean_sample_iterations": statistics.mean(t.sample_iterations) if timed else None,
            "seconds_per_iteration": med / iters if iters else None,
            "diverged_batches": t.diverged,
            # CUDA: the allocator's peak over the row's own timed batches, compiled rows included (the
            # compiler's memory is host memory, not the device's). CPU: a fresh process's, below.
            "peak_memory_mb": t.peak_mb,
            "inference_seconds_per_batch": _unless_diverged(t.inference_seconds, batches),
            **update_agreement(t.row, references),
        })
    by = {r["label"]: r for r in results}
    agreement = {}
    if {"rnn-lcp-di", "rnn-lcp-di-autograd"} <= set(by):
        agreement = paired_iterations(Row("rnn", "lcp-di"), Row("rnn", "lcp-di", impl="autograd"),
                                      start["rnn"], batches[:config.batches])
    memory: Dict[str, float] = {}
    if config.memory:
        probes = {"lcp_di_100": Row("rnn", "lcp-di", options={"tol": 0.0, "max_iter": 100}),
                  "lcp_di_800": Row("rnn", "lcp-di", options={"tol": 0.0, "max_iter": 800}),
                  "bptt_100": Row("rnn", "bptt", options={"max_iter": 100}),
                  "bptt_800": Row("rnn", "bptt", options={"max_iter": 800})}
        for key, row in tqdm(probes.items(), desc="memory", disable=not config.progress, leave=False):
            memory[key] = peak_memory_mb(row, config)
        # On CUDA every row already has its peak from its timed batches.
        cpu_rows = results if config.device == "cpu" else []
        for r in tqdm(cpu_rows, desc="memory per row", disable=not config.progress, leave=False):
            options = _row_options(rows, r["label"])
            # On the CPU a compiled row's first batch measures the compiler (hundreds of MB), a later
            # one only the buffers left from the first; neither compares with the eager rows: none given.
            if not options.get("compile"):
                r["peak_memory_mb"] = peak_memory_mb(Row(r["model"], r["method"], r["impl"], options), config)
    pairs = _ratio_rows(by)
    ratios = _ratios(by, pairs, memory)
    ratios["rnn_lcp_di_iterations_autograd_over_fast_same_network"] = agreement.get("ratio")
    intervals = {key: ratio_interval(by[a]["seconds_per_batch"], by[b]["seconds_per_batch"], seed=config.seed)
                 for key, (a, b) in pairs.items() if a in by and b in by}
    return {"config": asdict(config), "environment": environment(config), "rows": results, "memory_probes_mb": memory,
            "ratio_rows": {key: list(pair) for key, pair in pairs.items()},
            "iteration_agreement": agreement, "ratios": ratios, "ratio_intervals_95": intervals}


def environment(config: BenchConfig) -> Dict[str, Any]:
    """What the figures were measured on: PyTorch's version, the device's name, CPU threads."""
    import platform
    name = torch.cuda.get_device_name() if config.device == "cuda" else (platform.processor() or platform.machine())
    return {"torch": torch.__version__, "device_name": name, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def ratio_interval(numerator: Dict[int, float], denominator: Dict[int, float], draws: int = 2000,
                   level: float = 0.95, seed: int = 0) -> Optional[List[float]]:
    """Paired bootstrap interval of ``median(numerator) / median(denominator)``.

    Both map a bench round to the seconds of that round's batch; the rows ran interleaved, so a
    round's two times share the machine's state. Each of ``draws`` resamples draws the common rounds
    with replacement, the same rounds for both rows, and takes the ratio of the medians; the
    interval is the central ``level`` of those ratios. It measures how much the ratio depends on
    which batches were timed, not the drift between runs on a machine whose speed changes.

    Returns:
        ``[low, high]``, or None with fewer than two common rounds.
    """
    common = sorted(set(numerator) & set(denominator))
    if len(common) < 2:
        return None
    num = torch.tensor([numerator[r] for r in common], dtype=torch.float64)
    den = torch.tensor([denominator[r] for r in common], dtype=torch.float64)
    pick = torch.randint(len(common), (draws, len(common)), generator=torch.Generator().manual_seed(seed))
    ratios = num[pick].quantile(0.5, dim=1) / den[pick].quantile(0.5, dim=1)
    tail = (1.0 - level) / 2
    return [float(ratios.quantile(tail)), float(ratios.quantile(1.0 - tail))]


def _solver_label(method: Method) -> str:
    """The solver a row runs, with Euler's check-level Anderson memory when it mixes and ``+native``
    when the tail of every solve (free, adjoint, controlled) runs in C."""
    name = getattr(method, "solver", "-")
    memory = (getattr(method, "solver_options", None) or {}).get("anderson_memory")
    name = f"{name}+anderson{memory}" if memory else name
    return name + "+native" if getattr(method, "native", False) else name


def _row_options(rows: List[Row], label: str) -> Dict[str, Any]:
    return next(r.options for r in rows if r.name == label)


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


# Ratio key -> the LCP-DI row it divides by the fastest RBP row (the "equal_tol" rows run at RBP's 1e-4).
LCP_DI_OVER_RBP = {
    "rnn_lcp_di_over_rbp": "rnn-lcp-di",
    "rnn_lcp_di_over_rbp_equal_tol": "rnn-lcp-di-tol1e-4",
    "rnn_lcp_di_stall_over_rbp": "rnn-lcp-di-stall",
    "rnn_lcp_di_stall_over_rbp_equal_tol": "rnn-lcp-di-tol1e-4-stall",
    "rnn_lcp_di_gains_over_rbp": "rnn-lcp-di-gains",
    "rnn_lcp_di_gains_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4",
    "rnn_lcp_di_gains_stall_over_rbp": "rnn-lcp-di-gains-stall",
    "rnn_lcp_di_gains_stall_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall",
    "rnn_lcp_di_gains_over_rbp_equal_tol_and_cap": "rnn-lcp-di-gains-tol1e-4-max200",
    "rnn_lcp_di_compile_over_rbp": "rnn-lcp-di-compile",
    "rnn_lcp_di_compile_over_rbp_equal_tol": "rnn-lcp-di-tol1e-4-compile",
    "rnn_lcp_di_gains_stall_compile_over_rbp": "rnn-lcp-di-gains-stall-compile",
    "rnn_lcp_di_gains_stall_compile_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall-compile",
    "rnn_lcp_di_gains_stall_accel_over_rbp": "rnn-lcp-di-gains-stall-accel",
    "rnn_lcp_di_gains_stall_accel_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall-accel",
    "rnn_lcp_di_gains_stall_accel_compile_over_rbp": "rnn-lcp-di-gains-stall-accel-compile",
    "rnn_lcp_di_gains_stall_accel_compile_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall-accel-compile",
    "rnn_lcp_di_gains_compile_over_rbp": "rnn-lcp-di-gains-compile",
    "rnn_lcp_di_gains_stall300_compile_over_rbp": "rnn-lcp-di-gains-stall300-compile",
    "rnn_lcp_di_gains_stall300_compile_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall300-compile",
    "rnn_lcp_di_gains_accel_over_rbp": "rnn-lcp-di-gains-accel",
    "rnn_lcp_di_gains_accel_compile_over_rbp": "rnn-lcp-di-gains-accel-compile",
    "rnn_lcp_di_gains_stall300_accel_compile_over_rbp": "rnn-lcp-di-gains-stall300-accel-compile",
    "rnn_lcp_di_gains_stall300_accel_compile_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall300-accel-compile",
    "rnn_lcp_di_gains_native_over_rbp": "rnn-lcp-di-gains-native",
    "rnn_lcp_di_gains_stall300_native_over_rbp": "rnn-lcp-di-gains-stall300-native",
    "rnn_lcp_di_gains_stall300_native_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall300-native",
    "rnn_lcp_di_gains_stall300_accel_native_over_rbp": "rnn-lcp-di-gains-stall300-accel-native",
    "rnn_lcp_di_gains_stall300_accel_native_over_rbp_equal_tol": "rnn-lcp-di-gains-tol1e-4-stall300-accel-native",
}


def _fastest(by: Dict[str, Dict[str, Any]], method: str, tol: float, max_iter: int,
             agreeing: bool = True) -> Optional[str]:
    """The label of the fastest RNN row of ``method`` at this tolerance and cap, any solver; with
    ``agreeing``, among the rows that give the method's update (``agrees`` not False)."""
    timed = [r for r in by.values() if r["model"] == "rnn" and r["method"] == method and r["impl"] == "fast"
             and r["tol"] == tol and r["max_iter"] == max_iter and r["seconds_per_batch_median"] is not None
             and not (agreeing and r.get("agrees") is False)]
    return min(timed, key=lambda r: r["seconds_per_batch_median"])["label"] if timed else None


def _ratio_rows(by: Dict[str, Dict[str, Any]]) -> Dict[str, tuple]:
    """The headline time ratios as (numerator row, denominator row); a row the run lacks is None."""
    # RBP at its published 1e-4 / 200 serves the published comparison and the one at 1e-4.
    rbp = _fastest(by, "rbp", 1e-4, 200)
    return {
        "rnn_lcp_di_autograd_over_fast": ("rnn-lcp-di-autograd", "rnn-lcp-di"),
        # The fastest LCP-DI setting at each tolerance (cap 800) over the fastest RBP setting.
        "rnn_lcp_di_best_over_rbp": (_fastest(by, "lcp-di", 1e-6, 800), rbp),
        "rnn_lcp_di_best_over_rbp_equal_tol": (_fastest(by, "lcp-di", 1e-4, 800), rbp),
        # Equal tolerance the other way: RBP brought to LCP-DI's 1e-6 and cap 800.
        "rnn_lcp_di_best_over_rbp_equal_tol_1e-6": (_fastest(by, "lcp-di", 1e-6, 800), _fastest(by, "rbp", 1e-6, 800)),
        # The same three with every row competing, also those whose update differs from the method's.
        "rnn_lcp_di_fastest_over_rbp": (_fastest(by, "lcp-di", 1e-6, 800, False), _fastest(by, "rbp", 1e-4, 200, False)),
        "rnn_lcp_di_fastest_over_rbp_equal_tol": (_fastest(by, "lcp-di", 1e-4, 800, False),
                                                  _fastest(by, "rbp", 1e-4, 200, False)),
        "rnn_lcp_di_fastest_over_rbp_equal_tol_1e-6": (_fastest(by, "lcp-di", 1e-6, 800, False),
                                                       _fastest(by, "rbp", 1e-6, 800, False)),
        "ff_lcp_di_over_bp": ("ff-lcp-di", "ff-bp"),
        "ff_lcp_di_compile_over_bp": ("ff-lcp-di-compile", "ff-bp"),
    }


def _ratios(by: Dict[str, Dict[str, Any]], pairs: Dict[str, tuple], memory: Dict[str, float]) -> Dict[str, Any]:
    def sec(label):
        return by[label]["seconds_per_batch_median"] if label in by else None

    def its(label):
        return by[label]["mean_iterations"] if label in by else None

    def over(key):
        numerator, denominator = pairs[key]
        return _ratio(sec(numerator), sec(denominator))

    best_rbp = sec(pairs["rnn_lcp_di_best_over_rbp"][1])
    return {
        "rnn_lcp_di_autograd_over_fast": over("rnn_lcp_di_autograd_over_fast"),
        "rnn_lcp_di_iterations_autograd_over_fast": _ratio(its("rnn-lcp-di-autograd"), its("rnn-lcp-di")),
        **{key: _ratio(sec(label), best_rbp) for key, label in LCP_DI_OVER_RBP.items()},
        **{key: over(key) for key in pairs if key != "rnn_lcp_di_autograd_over_fast"},
        "lcp_di_memory_800_over_100": _ratio(memory.get("lcp_di_800"), memory.get("lcp_di_100")),
        "bptt_memory_800_over_100": _ratio(memory.get("bptt_800"), memory.get("bptt_100")),
    }


def _agreement_cell(r: Dict[str, Any]) -> str:
    """``0.999999 (12)``: the smallest cosine and the batches compared; ``*`` marks a row whose update
    differs from its method's (below ``AGREEMENT``), which the headline ratios leave out."""
    cos = r.get("update_cosine_vs_autograd")
    if cos is None:
        return "–"
    return f"{cos:.6f} ({r.get('agreement_batches', 1)}){'' if r.get('agrees', True) else ' *'}"


def format_table(result: Dict[str, Any]) -> str:
    """The rows and ratios as a Markdown table (also printed on the terminal)."""
    lines = ["| row | solver | tol | s/batch median | s/batch min | iterations | iters/sample | ms/iteration "
             "| peak MB | inference s/batch | cos vs autograd (min, batches) | diverged batches |", "|" + "---|" * 12]

    def f(v, spec):
        return "–" if v is None else format(v, spec)

    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['solver']} | {f(r['tol'], 'g')} | {f(r['seconds_per_batch_median'], '.4f')} "
                     f"| {f(r['seconds_per_batch_min'], '.4f')} | {f(r['mean_iterations'], '.1f')} "
                     f"| {f(r['mean_sample_iterations'], '.1f')} "
                     f"| {f(r['seconds_per_iteration'] and 1000 * r['seconds_per_iteration'], '.3f')} "
                     f"| {f(r['peak_memory_mb'], '.1f')} | {f(r['inference_seconds_per_batch'], '.4f')} "
                     f"| {_agreement_cell(r)} | {r.get('diverged_batches', 0)} |")
    intervals = result.get("ratio_intervals_95", {})

    def interval(key):
        lo_hi = intervals.get(key)
        return "" if lo_hi is None else f"{lo_hi[0]:.3f}–{lo_hi[1]:.3f}"

    lines += ["", "| ratio | value | 95 % interval over the timed batches |", "|---|---|---|"]
    lines += [f"| {k} | {'–' if v is None else format(v, '.3f')} | {interval(k)} |" for k, v in result["ratios"].items()]
    if result.get("memory_probes_mb"):
        lines += ["", "| memory probe (tol 0: every iteration runs) | peak MB |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["memory_probes_mb"].items()]
    return "\n".join(lines)


def main_bench(config: BenchConfig) -> Dict[str, Any]:
    """Run the benchmark (the rows ``config.rows`` names, else all), print the table, write
    ``json_out`` atomically. Ratios whose rows did not run are None."""
    result = run_bench(config, None if config.rows is None else rows_named(config.rows))
    print(format_table(result))
    if config.json_out:
        write_json(Path(config.json_out), result)
    return result
