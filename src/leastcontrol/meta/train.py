"""The meta-training loop: Adam on ω with any meta-gradient method, held-out evaluation."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from ..atomic import write_json
from ..errors import ConfigError
from .methods import META_METHODS, get_meta_method
from .problem import InnerProblem, InnerSettings
from .tasks import Sinusoid

TASKS = {"sinusoid": Sinusoid}


@dataclass
class MetaConfig:
    """Everything a meta-training run depends on; validated at construction."""

    task: str = "sinusoid"
    method: str = "lcp"
    shots: int = 10
    queries: int = 10
    meta_batch: int = 25
    meta_steps: int = 1000
    meta_lr: float = 1e-3
    inner_solver: str = "gd"
    inner_lr: float = 0.01
    inner_steps: int = 300
    inner_tol: float = 1e-5
    lam: float = 1.0
    beta: float = 0.1
    route: str = "di"
    cg_steps: int = 10
    eval_tasks: int = 1000
    eval_queries: int = 100
    log_every: int = 50
    seed: int = 0
    json_out: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"unknown meta task '{self.task}'; valid: {', '.join(sorted(TASKS))}")
        META_METHODS.factory(self.method)
        for key in ("shots", "queries", "meta_batch", "meta_steps", "inner_steps", "eval_tasks", "eval_queries",
                    "log_every", "cg_steps"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("meta_lr", "lam", "beta", "inner_lr"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        self.inner_settings()
        self.build_method()

    def inner_settings(self) -> InnerSettings:
        return InnerSettings(self.inner_solver, self.inner_lr, self.inner_steps, self.inner_tol)

    def build_method(self):
        options = {"inner": self.inner_settings()}
        if self.method in ("lcp", "contrastive"):
            options["beta"] = self.beta
        if self.method == "lcp":
            options["route"] = self.route
        if self.method == "imaml":
            options["cg_steps"] = self.cg_steps
        return get_meta_method(self.method, **options)


def evaluate(problem: InnerProblem, omega: torch.Tensor, task, settings: InnerSettings, n_tasks: int,
             queries: int, seed: int, chunk: int = 100) -> Dict[str, Any]:
    """Post-adaptation loss on ``n_tasks`` held-out tasks: mean and 95% confidence half-width."""
    g = torch.Generator().manual_seed(10_000 + seed)  # never the training stream
    values = []
    for start in range(0, n_tasks, chunk):
        batch = task.sample(min(chunk, n_tasks - start), g, queries=queries)
        phi = problem.equilibrium(omega, batch.x, batch.y, settings).state
        with torch.no_grad():
            values.append(problem.losses(phi, batch.xq, batch.yq))
    v = torch.cat(values).double()
    return {"metric": "mse", "mean": float(v.mean()), "ci95": float(1.96 * v.std() / math.sqrt(len(v))),
            "tasks": int(len(v))}


def meta_train(config: MetaConfig) -> Dict[str, Any]:
    """Meta-train ω (the learner's initialisation and anchor) and evaluate it on held-out tasks.

    Returns:
        ``{"config", "history": [{"step", "val_loss", "seconds"}], "test": {"metric", "mean", "ci95",
        "tasks"}, "test_untrained": {...}, "train_seconds"}``; also written to ``config.json_out``.
    """
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    task = TASKS[config.task](shots=config.shots, queries=config.queries)
    model = task.model(g)
    problem = InnerProblem(model, task.loss, lam=config.lam)
    method = config.build_method()
    settings = config.inner_settings()
    omega = torch.nn.Parameter(problem.initial_weights())
    untrained = evaluate(problem, omega.detach(), task, settings, config.eval_tasks, config.eval_queries, config.seed)
    opt = torch.optim.Adam([omega], lr=config.meta_lr)
    history, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(1, config.meta_steps + 1), desc=f"meta {config.method}", disable=not config.progress)
    for step in bar:
        out = method(problem, omega.detach(), task.sample(config.meta_batch, g))
        omega.grad = out.grad.to(omega.dtype)
        opt.step()
        window.append(out.val_loss)
        if step % config.log_every == 0 or step == config.meta_steps:
            history.append({"step": step, "val_loss": sum(window) / len(window),
                            "seconds": time.perf_counter() - start})
            bar.set_postfix(val=f"{history[-1]['val_loss']:.3f}")
            window = []
    train_seconds = time.perf_counter() - start
    test = evaluate(problem, omega.detach(), task, settings, config.eval_tasks, config.eval_queries, config.seed)
    result = {"config": asdict(config), "history": history, "test": test, "test_untrained": untrained,
              "train_seconds": train_seconds}
    if config.json_out:
        write_json(Path(config.json_out), result)
    return result
