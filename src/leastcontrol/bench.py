"""Speed and memory benchmark of the learning methods: ``leastcontrol bench``.

The rows and ratios are data, ``configs/bench.toml`` (shipped with the package; the repository's
``benchmarks/bench.toml`` links to it), read by :func:`load_plan`; this module runs them. A row is a
model, a method table as :func:`~leastcontrol.methods.method_from_dict` reads it (its solvers and
their backends included), laid over the published set-up of ``configs/mnist-<model>-<method>.toml``,
and the path settings that change how the method reaches its equilibrium but not the equilibrium.

Every row trains its own copy of the same starting network on the same MNIST-sized batches. The
rows are timed interleaved — batch ``i`` of every row before batch ``i + 1`` of any — so a slow
spell of a noisy machine hits all rows alike and the ratios stay fair. Peak memory of one training
batch is measured in a fresh subprocess per setting on the CPU (peak resident set size); on CUDA
the allocator's own peak (``torch.cuda.max_memory_allocated``) is exact per step, so it is read in
the bench's process, around each timed batch.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from tqdm import tqdm

from .atomic import check_outputs, write_json
from .config import merge, read_file
from .errors import ConfigError, SolverDivergedError
from .methods import method_from_dict
from .methods.base import EquilibriumMethod, Method
from .reproduce import available_rows
from .systems import SYSTEMS, get_system
from .train import DEFAULT_GRAD_CLIP, clip_gradients, gradient_clip_groups

# What a ratio can divide (see the header of configs/bench.toml), and the result columns a pick may name.
MEASURES = ("seconds", "iterations", "iterations_same_network", "memory")
PICK_KEYS = ("model", "method", "impl", "tol", "max_iter", "solver")


@functools.lru_cache(maxsize=None)
def _published(model: str, method: str) -> str:
    path = available_rows("mnist").get(f"{model}-{method}")
    return json.dumps({} if path is None else read_file(path).get("method", {}))


def published_method(model: str, method: str) -> Dict[str, Any]:
    """The ``[method]`` table of the shipped ``configs/mnist-<model>-<method>.toml`` (``{}`` where there is none)."""
    return json.loads(_published(model, method))


@dataclass
class Row:
    """One benchmarked setting.

    Args:
        model: the system (``ff``, ``rnn``).
        method: a method table (``name``, settings, solvers as tables) or a method's name, laid over the
            published ``[method]`` table of ``configs/mnist-<model>-<name>.toml`` where that file exists.
        impl: ``fast`` or ``autograd`` (the research-code path).
        path: settings laid over ``method`` that change the path to the method's equilibrium, not the
            equilibrium; the row's :meth:`reference` leaves them out.
        label: the row's name in the report (default ``<model>-<method>``, then ``-<impl>`` unless fast).
    """

    model: str
    method: Any
    impl: str = "fast"
    path: Dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        self.method = {"name": self.method} if isinstance(self.method, str) else dict(self.method)
        self.path = dict(self.path)

    @property
    def method_name(self) -> str:
        return self.method.get("name", "lcp-di")

    @property
    def name(self) -> str:
        return self.label or f"{self.model}-{self.method_name}" + ("" if self.impl == "fast" else f"-{self.impl}")

    def table(self) -> Dict[str, Any]:
        """The method table the row builds: the published one, ``method`` over it, ``path`` over that, and ``impl``."""
        table = merge(merge(published_method(self.model, self.method_name), self.method), self.path)
        return table if self.impl == "fast" else {**table, "impl": self.impl}

    def build(self) -> Method:
        """A fresh method of this row; a ConfigError names the row and the setting at fault."""
        try:
            return method_from_dict(self.table(), model=self.model)
        except ConfigError as err:
            raise ConfigError(f"bench row '{self.name}': {err}") from None

    def reference(self) -> Optional["Row"]:
        """The research-code path this row's update is compared with (None: nothing to compare).

        A fast row whose update comes out of a solve after the free one (an equilibrium method with a
        second phase) is compared with its ``method`` without the ``path`` settings at impl ``autograd``:
        Euler, every step to the tolerance or the step cap, one ``torch.autograd.grad`` per step.
        """
        method = self.build()
        if self.impl != "fast" or not (isinstance(method, EquilibriumMethod) and len(method.phases) > 1):
            return None
        return Row(self.model, self.method, "autograd", label=f"{self.name} (reference)")

    def uses_backend(self, backend: str) -> bool:
        """Whether a solver of the row's method may run steps on ``backend`` (``compile``, ``native``)."""
        method = self.build()
        return isinstance(method, EquilibriumMethod) and method.uses_backend(backend)


@dataclass
class Ratio:
    """``of`` the numerator over ``of`` the denominator. A term is a row label (a probe's name for
    ``memory``) or a pick, ``{"best": name}`` or ``{"fastest": name}`` (see ``configs/bench.toml``)."""

    name: str
    numerator: Any
    denominator: Any
    of: str = "seconds"
    headline: bool = False


@dataclass
class Plan:
    """A bench's rows, memory probes, pretraining rows, picks and ratios (``configs/bench.toml``)."""

    rows: Dict[str, Row]
    probes: Dict[str, Row]
    pretrain: Dict[str, str]
    picks: Dict[str, Dict[str, Any]]
    ratios: Dict[str, Ratio]


def _table(data: Mapping[str, Any], key: str, where: str, valid=None) -> Dict[str, Any]:
    """``data[key]`` (default ``{}``), checked to be a table whose keys are in ``valid``."""
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{key} must be a table, got {value!r}")
    unknown = sorted(set(value) - set(valid or value))
    if unknown:
        raise ConfigError(f"{where}.{key}: unknown key '{unknown[0]}'; valid keys: {', '.join(valid)}")
    return dict(value)


def _row(label: str, data: Mapping[str, Any], paths: Mapping[str, Any], where: str) -> Row:
    spec = _table(data, label, where, ("model", "method", "path", "impl"))
    if spec.get("model") not in SYSTEMS:
        raise ConfigError(f"{where}.{label}.model: unknown model {spec.get('model')!r}; "
                          f"valid: {', '.join(SYSTEMS.names())}")
    names = spec.get("path", [])
    path: Dict[str, Any] = {}
    for name in names if isinstance(names, list) else [names]:
        if name not in paths:
            raise ConfigError(f"{where}.{label}.path: {name!r} is no [path] table's name; valid: {', '.join(paths)}")
        path = merge(path, paths[name])
    row = Row(spec.get("model"), _table(spec, "method", f"{where}.{label}"), spec.get("impl", "fast"), path, label)
    try:
        method_from_dict(row.table(), model=row.model)   # every setting is checked when the plan is read
    except ConfigError as err:
        raise ConfigError(f"{where}.{label}: {err}") from None
    return row


def _term(value, plan: Plan, of: str, where: str):
    known = plan.probes if of == "memory" else plan.rows
    if isinstance(value, str) and value in known:
        return value
    if (of in ("seconds", "iterations") and isinstance(value, Mapping) and len(value) == 1
            and set(value) <= {"best", "fastest"} and next(iter(value.values())) in plan.picks):
        return dict(value)
    raise ConfigError(f"{where}: {value!r} is no {'probe' if of == 'memory' else 'row'} "
                      f"({', '.join(known)}) nor {{ best | fastest = PICK }} of a seconds or iterations ratio "
                      f"(picks: {', '.join(plan.picks)})")


def load_plan(path: str | Path | None = None) -> Plan:
    """The bench's rows and ratios from a TOML file (default: the shipped ``configs/bench.toml``).

    Raises:
        ConfigError: an unknown section, key, path, row, probe or pick, or a row whose method does not
            build; the message names the file and the key.
    """
    if path is None:
        return _default_plan()
    where = str(path)
    data = read_file(path)
    sections = ("pretrain", "path", "row", "probe", "pick", "ratio")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown section '{unknown[0]}'; valid: {', '.join(sections)}")
    paths, rows, probes = (_table(data, key, where) for key in ("path", "row", "probe"))
    plan = Plan({label: _row(label, rows, paths, f"{where}: row") for label in rows},
                {name: _row(name, probes, {}, f"{where}: probe") for name in probes},
                _table(data, "pretrain", where), {}, {})
    for model, label in plan.pretrain.items():
        if label not in plan.rows or plan.rows[label].model != model:
            raise ConfigError(f"{where}: pretrain.{model} must name a row of model '{model}', got {label!r}")
    picks = _table(data, "pick", where)
    plan.picks = {name: _table(picks, name, f"{where}: pick", PICK_KEYS) for name in picks}
    ratios = _table(data, "ratio", where)
    for name in ratios:
        spec = _table(ratios, name, f"{where}: ratio", ("numerator", "denominator", "of", "headline"))
        of, headline = spec.get("of", "seconds"), spec.get("headline", False)
        if of not in MEASURES or headline not in (True, False) or (headline and of != "seconds"):
            raise ConfigError(f"{where}: ratio.{name}: `of` is one of {', '.join(MEASURES)}; `headline` is true "
                              f"or false, true for seconds ratios only; got of={of!r}, headline={headline!r}")
        terms = [_term(spec.get(side), plan, of, f"{where}: ratio.{name}.{side}")
                 for side in ("numerator", "denominator")]
        plan.ratios[name] = Ratio(name, *terms, of=of, headline=headline)
    same = [r for r in plan.ratios.values() if r.of == "iterations_same_network"]
    if len(same) > 1 or any(isinstance(t, Mapping) for r in same for t in (r.numerator, r.denominator)):
        raise ConfigError(f"{where}: the report has one iteration_agreement: at most one ratio of "
                          f"'iterations_same_network', between two rows")
    return plan


@functools.lru_cache(maxsize=1)
def _default_plan() -> Plan:
    return load_plan(Path(str(resources.files("leastcontrol") / "configs" / "bench.toml")))


def default_rows() -> List[Row]:
    """The rows of the shipped plan, in its order (copies)."""
    return copy.deepcopy(list(_default_plan().rows.values()))


def rows_for_device(rows: List[Row], device: str) -> List[Row]:
    """The rows that run on ``device``: the C steps (the ``native`` backend) are the CPU's."""
    return rows if device == "cpu" else [r for r in rows if not r.uses_backend("native")]


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
        self.clip = DEFAULT_GRAD_CLIP.get(row.model, 0.0)   # as `train` clips each model
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
# on every timed batch where the reference settles; only such rows compete for the `best` picks.
AGREEMENT = 0.9999


class References:
    """The reference paths' updates on fixed weights and batches, each reference computed once.

    A batch where the reference's solves do not settle (some sample at its step cap) or diverge has no
    update to agree with: the reference there is one snapshot of a sample's orbit, and any other path
    or step count gives another. It is ``None`` in :meth:`updates`.
    """

    def __init__(self, nets: Dict[str, Any], batches):
        self.nets, self.batches = nets, batches
        self._cache: Dict[str, List[Optional[torch.Tensor]]] = {}

    def updates(self, reference: Row) -> List[Optional[torch.Tensor]]:
        key = json.dumps([reference.model, reference.table()], sort_keys=True, default=str)
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
                updates.append(flat_update(out.grads).double() if method.settled(out.stats) else None)
            self._cache[key] = updates
        return self._cache[key]


def update_agreement(row: Row, references: References) -> Dict[str, Any]:
    """The row's update against its reference path's on each of the references' batches (fixed weights).

    Returns:
        ``{"update_cosines": [...], "update_cosine_vs_autograd": smallest of them, "agreement_batches": n,
        "agrees": bool}``: one cosine per batch (float64), ``None`` where the reference did not settle or
        the row diverged; the smallest over the ``n`` batches that have one (``None`` when none has, or
        the row has no reference); whether that smallest one exceeds ``AGREEMENT`` (``None``: no reference).
    """
    reference = row.reference()
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


def _pretrained(model: str, config: BenchConfig, batches, plan: Optional[Plan] = None) -> Any:
    """The starting network of every row of ``model``: ``pretrain`` batches of the plan's pretraining row
    for that model (``[pretrain]``: bp for ff, lcp-di for rnn in the shipped plan)."""
    plan = plan or load_plan()
    net = _network(model, config)
    if config.pretrain:
        if model not in plan.pretrain:
            raise ConfigError(f"the bench plan names no row to pretrain '{model}' with ([pretrain] {model} = LABEL)")
        trainer = _Trainer(plan.rows[plan.pretrain[model]], net, config)
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


def run_bench(config: BenchConfig, rows: Optional[List[Row]] = None, plan: Optional[Plan] = None) -> Dict[str, Any]:
    """Time every row interleaved and return the report: ``config``, ``environment``, ``rows``,
    ``memory_probes_mb``, ``ratio_rows``, ``iteration_agreement``, ``ratios``, ``ratio_intervals_95``
    (see ``docs/performance.md``). ``rows``: default, every row of ``plan`` (the shipped plan) that
    runs on the device; the ratios, probes and pretraining come from ``plan``."""
    plan = plan or load_plan()
    rows = rows or rows_for_device(list(copy.deepcopy(plan.rows).values()), config.device)
    for row in rows:   # every method and reference builds before minutes of timing
        row.build()
        reference = row.reference()
        if reference is not None:
            reference.build()
    n = config.warmup + config.batches
    batches, pretraining = split_batches(config, max(n, 8))
    start = {m: _pretrained(m, config, pretraining, plan) for m in sorted({r.model for r in rows})}
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
        solver = t.method.solver if isinstance(t.method, EquilibriumMethod) else None
        results.append({
            "model": t.row.model, "method": t.row.method_name, "impl": t.row.impl, "label": t.row.name,
            "solver": _solver_label(t.method),
            "tol": None if solver is None else solver.tol, "max_iter": None if solver is None else solver.max_steps,
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
    agreement: Dict[str, Any] = {}
    ran = {r.name: r for r in rows}
    for ratio in plan.ratios.values():
        if ratio.of == "iterations_same_network" and {ratio.numerator, ratio.denominator} <= set(ran):
            agreement = paired_iterations(ran[ratio.denominator], ran[ratio.numerator],
                                          start[ran[ratio.denominator].model], batches[:config.batches])
    memory: Dict[str, float] = {}
    if config.memory:
        for key, row in tqdm(plan.probes.items(), desc="memory", disable=not config.progress, leave=False):
            memory[key] = peak_memory_mb(row, config)
        # On CUDA every row already has its peak from its timed batches. On the CPU a compiled row's first
        # batch measures the compiler (hundreds of MB), a later one only the buffers left from the first;
        # neither compares with the eager rows: none given.
        cpu_rows = [t.row for t in trainers if not t.row.uses_backend("compile")] if config.device == "cpu" else []
        for row in tqdm(cpu_rows, desc="memory per row", disable=not config.progress, leave=False):
            by[row.name]["peak_memory_mb"] = peak_memory_mb(row, config)
    pairs = ratio_rows(plan, by)
    intervals = {key: ratio_interval(by[a]["seconds_per_batch"], by[b]["seconds_per_batch"], seed=config.seed)
                 for key, (a, b) in pairs.items() if a in by and b in by}
    return {"config": asdict(config), "environment": environment(config), "rows": results, "memory_probes_mb": memory,
            "ratio_rows": {key: list(pair) for key, pair in pairs.items()},
            "iteration_agreement": agreement, "ratios": ratios(plan, by, memory, agreement),
            "ratio_intervals_95": intervals}


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
    """The solver of every phase that has none of its own (``-``: no solver), with ``+anderson<m>`` when
    it mixes at its checks (memory m) and ``+native`` when the tail of its solves may run in C."""
    if not isinstance(method, EquilibriumMethod):
        return "-"
    solver = method.solver
    name = solver.name + (f"+anderson{solver.mix.memory}" if solver.mix is not None else "")
    return name + ("+native" if any(b.name == "native" for b in solver._backends) else "")


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _pick(by: Dict[str, Dict[str, Any]], values: Dict[str, Any], agreeing: bool) -> Optional[str]:
    """The label of the fastest timed row with ``values`` in its columns; with ``agreeing``, among the rows
    whose update agrees with their reference's or that have none (``agrees`` not False)."""
    timed = [r for r in by.values() if all(r.get(k) == v for k, v in values.items())
             and r["seconds_per_batch_median"] is not None and not (agreeing and r.get("agrees") is False)]
    return min(timed, key=lambda r: r["seconds_per_batch_median"])["label"] if timed else None


def _label(term, plan: Plan, by: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """A ratio's term as a row label (a pick that matches no row: None)."""
    if isinstance(term, str):
        return term
    (rule, name), = term.items()
    return _pick(by, plan.picks[name], agreeing=rule == "best")


def ratio_rows(plan: Plan, by: Dict[str, Dict[str, Any]]) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """The headline ratios' rows, ``(numerator, denominator)`` labels; a pick with no row is None."""
    return {r.name: (_label(r.numerator, plan, by), _label(r.denominator, plan, by))
            for r in plan.ratios.values() if r.headline}


def ratios(plan: Plan, by: Dict[str, Dict[str, Any]], memory: Dict[str, float],
           agreement: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Every ratio of the plan, in its order; None where a term's row or probe did not run."""
    column = {"seconds": "seconds_per_batch_median", "iterations": "mean_iterations"}

    def value(term, of):
        if of == "memory":
            return memory.get(term)
        label = _label(term, plan, by)
        return by[label][column[of]] if label in by else None

    out: Dict[str, Optional[float]] = {}
    for r in plan.ratios.values():
        if r.of == "iterations_same_network":
            out[r.name] = agreement.get("ratio")
        else:
            out[r.name] = _ratio(value(r.numerator, r.of), value(r.denominator, r.of))
    return out


def _agreement_cell(r: Dict[str, Any]) -> str:
    """``0.999999 (12)``: the smallest cosine and the batches compared; ``*`` marks a row whose update
    differs from its method's (below ``AGREEMENT``), which the ``best`` picks leave out."""
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
    check_outputs({"--json-out": config.json_out})   # before minutes of timing
    result = run_bench(config, None if config.rows is None else rows_named(config.rows))
    print(format_table(result))
    if config.json_out:
        write_json(Path(config.json_out), result)
    return result
